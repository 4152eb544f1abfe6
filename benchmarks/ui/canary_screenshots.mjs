// The MLflow UI in a real headless Chrome after retrains and a canary (benchmarks/ui/canary_ui.sh): screenshots of
// the training experiment (opening on its runs), a compare view of its PPO runs, the canary run and the served
// traces filtered by arm. Prints what each page shows, so a run can be checked without opening the images.
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";
const [base, experiment, out] = process.argv.slice(2);
const api = async (path, body) => (await fetch(`${base}/api/2.0/mlflow/${path}`, body ? {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) } : {})).json();
const training = (await api(`experiments/get-by-name?experiment_name=${experiment}`)).experiment.experiment_id;
const serving = (await api(`experiments/get-by-name?experiment_name=${experiment}-serving`)).experiment.experiment_id;
const ppo = (await api("runs/search", { experiment_ids: [training], filter: "tags.stage = 'ppo'", max_results: 10 })).runs || [];
const canary = ((await api("runs/search", { experiment_ids: [serving], filter: "tags.`rlhf.kind` = 'canary'" })).runs || [])[0];
const browser = await puppeteer.launch({ executablePath: await chromium.executablePath(), args: [...chromium.args, "--lang=en-US"],
  headless: true, defaultViewport: { width: 1800, height: 1000 } });
const page = await browser.newPage();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const dismiss = async () => {
  await page.evaluate(() => {
    for (const t of ["Got it", "Dismiss", "Close"]) {
      const el = Array.from(document.querySelectorAll("button, [role=button]")).find(e => e.textContent.trim() === t);
      if (el) el.click();
    }
  });
  await sleep(800);
};
const shot = async (url, name, wait = 4000) => {
  await page.goto(`${base}/${url}`, { waitUntil: "networkidle0", timeout: 60000 });
  await sleep(wait);
  await dismiss();
  await page.screenshot({ path: `${out}/${name}.png` });
  const text = await page.evaluate(() => document.body.innerText);
  console.log(`== ${name}: ${page.url()}\n${text.slice(0, 1200).replace(/\n+/g, " | ")}\n`);
};
// the link `rlhf run` prints: MLflow 3.17 opens an experiment on its global GenAI overview unless the route says
await shot(`#/experiments/${training}?workflowType=machine_learning`, "mlflow_training_runs");
const ids = ppo.map(r => r.info.run_id);
await shot(`#/compare-runs?runs=${encodeURIComponent(JSON.stringify(ids))}&experiments=${encodeURIComponent(JSON.stringify([training]))}&workflowType=machine_learning`, "mlflow_compare_ppo");
if (canary) {
  await shot(`#/experiments/${serving}/runs/${canary.info.run_id}/artifacts/canary_curves.png?workflowType=machine_learning`, "mlflow_canary_run");
}
await shot(`#/experiments/${serving}/traces?workflowType=genai`, "mlflow_traces_by_arm_all", 5000);
// the traces table's Filters panel: field Tag, key rlhf.arm, value challenger (the search box matches ids, inputs
// and outputs only)
await page.evaluate(() => { const g = Array.from(document.querySelectorAll("button")).find(e => e.textContent.trim() === "Got it"); if (g) g.click(); });
await sleep(800);
await page.evaluate(() => { const el = Array.from(document.querySelectorAll("button, [role=button]")).find(e => (e.textContent.trim() || e.getAttribute("aria-label") || "").startsWith("Filters")); if (el) el.click(); });
await sleep(1500);
await page.click('button[aria-label="Filter field"]');
await sleep(1000);
await page.evaluate(() => { const el = Array.from(document.querySelectorAll("[role=option]")).find(e => e.textContent.trim() === "Tag"); if (el) el.click(); });
await sleep(1000);
await page.type('input[aria-label="Filter key"]', "rlhf.arm");
await page.type('input[aria-label="Filter value"]', "challenger");
await page.evaluate(() => { const el = Array.from(document.querySelectorAll("button")).find(e => e.textContent.trim() === "Apply filters"); if (el) el.click(); });
await sleep(4000);
await page.keyboard.press("Escape");
await sleep(1000);
await page.screenshot({ path: `${out}/mlflow_traces_by_arm.png` });
const filtered = await page.evaluate(() => document.body.innerText);
console.log(`== traces filtered by arm\n${filtered.slice(0, 1500).replace(/\n+/g, " | ")}`);
await browser.close();
