// The MLflow UI in a real headless Chrome: the project's traces with their feedback, as screenshots.
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";
const [base, exp, out] = process.argv.slice(2);
const browser = await puppeteer.launch({ executablePath: await chromium.executablePath(), args: chromium.args, headless: true,
  defaultViewport: { width: 1900, height: 1000 } });
const page = await browser.newPage();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const clickText = async (t) => page.evaluate((t) => {
  const el = Array.from(document.querySelectorAll("button, [role=button], a, span, div")).find(e => e.textContent.trim() === t);
  if (el) { el.click(); return true; } return false; }, t);
await page.goto(`${base}/#/experiments/${exp}/traces`, { waitUntil: "networkidle0", timeout: 60000 });
await sleep(3000);
console.log("got it", await clickText("Got it"));
await page.evaluate(() => { const b = Array.from(document.querySelectorAll("button[aria-label]")).find(b => /close/i.test(b.getAttribute("aria-label"))); if (b) b.click(); });
await sleep(1500);
await page.screenshot({ path: `${out}/traces.png` });
const headers = await page.evaluate(() => Array.from(document.querySelectorAll("[role=columnheader], th")).map(e => e.textContent.trim()));
console.log("headers", JSON.stringify(headers));
// open one judged trace (Review 8: a thumbs up with rating 4): its detail shows the assessment
await page.evaluate(() => { const el = Array.from(document.querySelectorAll("[role=cell], td, span, div")).find(e => e.textContent.startsWith('{"prompt": "Review 8:')); if (el) el.click(); });
await sleep(3000);
await page.screenshot({ path: `${out}/trace_feedback.png` });
const text = await page.evaluate(() => document.body.innerText);
const i = text.indexOf("thumbs");
console.log("DETAIL", JSON.stringify(text.slice(Math.max(0, i - 300), i + 600)));
await browser.close();
