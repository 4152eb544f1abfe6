"""Roles on one shared base: `with roles.use(name):` activates a role for a block and always switches back,
with exactly the trainable adapters trainable, even when the block raises."""

import pytest
import torch

from components.config import LoraConfig as LoraSettings
from components.models.roles import REFERENCE, RewardScale, Roles, ScalarHead, lora_config


@pytest.fixture
def roles():
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    lora = lora_config(LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(base, lora, adapter_name="policy")
    model.add_adapter("value", lora)
    model.add_adapter("reward", lora)
    for name, p in model.named_parameters():  # LoRA B starts at 0: make every adapter change the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    r = Roles(model, None, ScalarHead(16), {}, RewardScale(0.0, 1.0), None)
    with r.use("policy"):
        pass
    return r


def trainable_adapters(model) -> set[str]:
    return {
        name
        for name in ("policy", "value", "reward")
        if all(p.requires_grad for n, p in model.named_parameters() if f".{name}." in n)
    }


def test_use_switches_and_switches_back(roles):
    ids = torch.tensor([[1, 2, 3]])
    policy = roles.model(input_ids=ids).logits
    with roles.use("value") as model:
        assert model.active_adapter == "value"
        value = model(input_ids=ids).logits
    with roles.use(REFERENCE):
        reference = roles.model(input_ids=ids).logits
    assert roles.model.active_adapter == "policy"
    assert not torch.allclose(policy, value) and not torch.allclose(policy, reference)
    assert torch.allclose(roles.model(input_ids=ids).logits, policy)
    assert trainable_adapters(roles.model) == {"policy", "value"}


@pytest.mark.parametrize("role", ["value", "reward", REFERENCE])
def test_an_exception_never_leaves_the_wrong_adapter_active_or_trainable(roles, role):
    with pytest.raises(RuntimeError, match="boom"):
        with roles.use(role):
            raise RuntimeError("boom")
    assert roles.model.active_adapter == "policy"
    assert trainable_adapters(roles.model) == {"policy", "value"}, "the reward adapter stays frozen"
