// How long a card's page takes in headless Chromium: navigation to
// /ui/cards/{iccid} until its charts are drawn (the cycle chart's canvas,
// the 60 daily bars and the per-cycle bars), for cards picked across
// the fleet. A benchmark, not a test: it prints p50/p99 and asserts
// nothing (docs/BENCHMARKS.md, "The console's card page").
//
//   FLOWCAP_URL=http://127.0.0.1:9464 FLOWCAP_TOKEN=... \
//     node bench/card-page.mjs [runs=50] [cards page limit=1000]
import { chromium } from 'playwright-core';

const URL = process.env.FLOWCAP_URL;
const TOKEN = process.env.FLOWCAP_TOKEN;
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const RUNS = Number(process.argv[2] ?? 50);
if (!URL || !TOKEN) throw new Error('set FLOWCAP_URL and FLOWCAP_TOKEN');

async function api(path) {
  const res = await fetch(`${URL}/api/v1${path}`, { headers: { Authorization: `Bearer ${TOKEN}` } });
  if (!res.ok) throw new Error(`${path}: ${res.status} ${await res.text()}`);
  return res.json();
}

// Cards spread over the first carrier's ICCIDs: the first card under
// each of RUNS prefixes (a page of one per prefix keeps picking cheap).
async function pick() {
  const picked = [];
  const first = await api('/cards?limit=1');
  const base = first.items[0].iccid;
  for (let i = 0; picked.length < RUNS && i < RUNS * 4; i += 1) {
    const n = String((i * 7919) % 1000000).padStart(6, '0');
    const prefix = base.slice(0, base.length - 6) + n.slice(0, 3);
    const page = await api(`/cards?limit=1&iccid_prefix=${prefix}`);
    if (page.items[0] && !picked.includes(page.items[0].iccid)) picked.push(page.items[0].iccid);
  }
  return picked;
}

function quantile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

const cards = await pick();
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run'],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
await context.addInitScript((t) => sessionStorage.setItem('flowcap-token', t), TOKEN);
const page = await context.newPage();
// One warm-up: the script and stylesheet are then cached (no-cache:
// revalidated, as a user's second page).
await page.goto(`${URL}/ui/cards/${cards[0]}`);
await page.locator('[data-testid=days]').waitFor();

const times = [];
for (const iccid of cards) {
  const start = Date.now();
  await page.goto(`${URL}/ui/cards/${iccid}`);
  await page.locator('[data-testid=usage-chart] canvas').waitFor();
  await page.locator('[data-testid=days]').waitFor();
  await page.locator('[data-testid=cycles]').waitFor();
  times.push(Date.now() - start);
}
await browser.close();
times.sort((a, b) => a - b);
const summary = await api('/summary');
console.log(
  JSON.stringify({
    cards: summary.cards,
    runs: times.length,
    p50_ms: quantile(times, 0.5),
    p99_ms: quantile(times, 0.99),
    max_ms: times[times.length - 1],
  }),
);
