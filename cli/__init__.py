"""The `rlhf` command: parse, compose the config, call a flow or a service function, print what was produced
and where. Imports flows and service; nothing imports it."""
