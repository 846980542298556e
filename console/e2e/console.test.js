// The console in headless Chromium against a running flowcap (started by
// flowcap/tests/console.rs, which gives FLOWCAP_URL and FLOWCAP_TOKEN, a
// write-scoped token). Every number the pages show is checked against
// the API's own answer, formatted by the same functions the pages use.
// Each test saves screenshots of its pages into FLOWCAP_SHOTS.
//
// The tests run in order (one file): the overview is read before any
// command changes the state.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { change, LATEST, newest } from '../src/events.js';
import { bytes, count, pct, POOL_STATES, time } from '../src/format.js';
import { cyclesBefore, dayWindow } from '../src/history.js';

const URL = process.env.FLOWCAP_URL;
const TOKEN = process.env.FLOWCAP_TOKEN;
const SHOTS = process.env.FLOWCAP_SHOTS;
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

assert.ok(URL && TOKEN, 'FLOWCAP_URL and FLOWCAP_TOKEN are set by flowcap/tests/console.rs');

let browser;
let page;

async function api(method, path, body) {
  const res = await fetch(`${URL}/api/v1${path}`, {
    method,
    headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json();
  assert.ok(res.ok, `${method} ${path}: ${res.status} ${JSON.stringify(data)}`);
  return data;
}

async function shot(name) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

const text = (sel) => page.locator(sel).first().innerText();

// The newest events of a filter, read as the pages read them.
const newestEvents = (filter, n) => newest((path) => api('GET', path), filter, n);

// The positions of an event table's rows, in order.
const eventRows = (testid) =>
  page.locator(`[data-testid=${testid}] tbody tr`).evaluateAll((rows) => rows.map((r) => r.dataset.key));

// Opens a page of the console with the token already kept for the tab.
async function open(path) {
  await page.goto(`${URL}/ui${path}`);
}

before(async () => {
  browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, headless: true });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  // Any request that leaves this server fails the test (no CDN, no fonts).
  const outside = [];
  await context.route('**/*', (route) => {
    if (!route.request().url().startsWith(URL)) outside.push(route.request().url());
    return route.continue();
  });
  page.outside = outside;
});

after(async () => {
  if (page) assert.deepEqual(page.outside, [], 'no request leaves the server');
  await browser?.close();
});

test('a page without a token goes to the login, which keeps the token', async () => {
  await open('/cards');
  await page.waitForURL(/\/ui\/login\?next=/);
  await page.locator('[data-testid=login-form]').waitFor();
  await page.fill('input[name=token]', 'not-a-token');
  await page.click('button[type=submit]');
  await page.locator('[data-testid=login-error]').waitFor();
  await shot('login');
  await page.fill('input[name=token]', TOKEN);
  await page.click('button[type=submit]');
  await page.waitForURL(/\/ui\/cards$/);
  await page.locator('[data-testid=card-table]').waitFor();
  const kept = await page.evaluate(() => sessionStorage.getItem('flowcap-token'));
  assert.equal(kept, TOKEN);
});

test('the overview shows the API summary', async () => {
  const summary = await api('GET', '/summary');
  await open('/');
  await page.locator('[data-testid=overview]').waitFor();
  assert.equal(await text('[data-testid=cards-total]'), count(summary.cards));
  assert.equal(await text('[data-testid=cards-80]'), count(summary.cards_at_80_pct));
  assert.equal(await text('[data-testid=cards-90]'), count(summary.cards_at_90_pct));
  for (const [state, n] of Object.entries(summary.cards_by_state)) {
    assert.equal(await text(`[data-testid=by-state] tr[data-key="${state}"] [data-testid=n]`), count(n), state);
  }
  for (const [reason, n] of Object.entries(summary.cards_by_reason)) {
    assert.equal(await text(`[data-testid=by-reason] tr[data-key="${reason}"] [data-testid=n]`), count(n), reason);
  }
  assert.ok(summary.cards > 0);
  // The ingestion panel: the run is over, so the counters stay.
  const ingestion = await api('GET', '/ingestion');
  await page.locator('[data-testid=ingestion]').waitFor();
  assert.ok(ingestion.records > 0 && ingestion.dead_letters > 0, JSON.stringify(ingestion));
  assert.equal(await text('[data-testid=ingested]'), count(ingestion.records));
  assert.equal(await text('[data-testid=dead]'), count(ingestion.dead_letters));
  assert.equal(await text('[data-testid=lag]'), '—');
  assert.equal(await page.locator('[data-testid=minutes] > span').count(), ingestion.minutes.length);
  // The latest cuts and restores: the API's newest card_state events.
  const latest = await newestEvents('kind=card_state', LATEST);
  assert.ok(latest.items.some((i) => change(i.event) === 'cut'), 'the run cut some card');
  await page.locator('[data-testid=latest-changes] tbody tr').first().waitFor();
  assert.deepEqual(await eventRows('latest-changes'), latest.items.map((i) => i.position));
  const first = latest.items[0];
  const row = page.locator(`[data-testid=latest-changes] tr[data-key="${first.position}"]`);
  assert.equal(await row.locator('a').first().getAttribute('href'), `/ui/cards/${first.event.iccid}`);
  assert.equal(await row.locator('[data-testid=kind]').innerText(), change(first.event));
  await shot('overview');
});

// The first card of the list with a limit and some usage, and active.
async function someActiveCard() {
  const page1 = await api('GET', '/cards?state=active&limit=1000');
  const card = page1.items.find((c) => c.limit_bytes && c.usage_bytes > 0) ?? page1.items[0];
  assert.ok(card, 'an active card');
  return card;
}

test("a card's page shows the API's numbers, and a suspend appears as manual", async () => {
  const card = await someActiveCard();
  // Custom attributes, declared and set through the API.
  const { clock } = await api('GET', '/summary');
  await api('POST', '/commands', [
    { id: `e2e-names-${Date.now()}`, type: 'set_attribute_names', at: clock, names: ['customer', 'site'] },
    {
      id: `e2e-attrs-${Date.now()}`,
      type: 'set_attributes',
      at: clock,
      iccids: [card.iccid],
      attributes: { customer: 'Acme Logistics', site: 'Shenzhen-3' },
    },
  ]);
  const fromApi = await api('GET', `/cards/${card.iccid}`);
  assert.deepEqual(fromApi.attributes, { customer: 'Acme Logistics', site: 'Shenzhen-3' });
  await open(`/cards/${card.iccid}`);
  await page.locator('[data-testid=card]').waitFor();
  assert.equal(await text('[data-testid=iccid]'), fromApi.iccid);
  assert.equal(await text('[data-testid=used]'), bytes(fromApi.usage_bytes));
  assert.equal(
    await text('[data-testid=limit]'),
    fromApi.limit_bytes === null ? 'none of its own' : bytes(fromApi.limit_bytes),
  );
  assert.equal(await text('[data-testid=remaining]'), bytes(fromApi.remaining_bytes));
  assert.equal(await text('[data-testid=pct]'), pct(fromApi.usage_pct));
  assert.equal(await text('[data-testid=addons]'), `${fromApi.addon_mb} MB`);
  assert.equal(await text('[data-testid=imei]'), fromApi.imei ?? '—');
  assert.equal(await text('[data-testid=last-record]'), time(fromApi.last_record_at));
  // The card's events, newest first, as the API gives them.
  const before = await newestEvents(`iccid=${card.iccid}`, 50);
  await page.locator('[data-testid=events]').waitFor();
  assert.deepEqual(await eventRows('events'), before.items.map((i) => i.position));
  await page.locator('[data-testid=usage-chart] canvas').waitFor();
  // Per-cycle bars: the API's usage answer (history, the live cycle last).
  const cycles = (
    await api('GET', `/cards/${card.iccid}/usage?granularity=cycle&from=${cyclesBefore(fromApi.cycle, 11)}`)
  ).items;
  assert.ok(cycles.length > 0);
  await page.locator('[data-testid=cycles]').waitFor();
  for (const c of cycles) {
    assert.equal(await text(`[data-testid=cycles] tr[data-key="${c.period}"] [data-testid=cycle-bytes]`), bytes(c.bytes), c.period);
  }
  assert.equal(cycles[cycles.length - 1].bytes, fromApi.usage_bytes, 'the live cycle is the card\'s usage');
  // Daily bars: the 60 days up to today or the end of the card's cycle
  // (the generated history's), each the API's daily sum.
  const shownDays = dayWindow(fromApi);
  const days = (
    await api('GET', `/cards/${card.iccid}/usage?granularity=day&from=${shownDays[0]}&to=${shownDays[59]}`)
  ).items;
  assert.ok(days.length > 0);
  await page.locator('[data-testid=days]').waitFor();
  assert.equal(await page.locator('[data-testid=days] > span').count(), 60);
  for (const d of days) {
    const bar = page.locator(`[data-testid=days] [data-key="${d.period}"]`);
    assert.equal(await bar.getAttribute('data-bytes'), bytes(d.bytes), d.period);
  }
  for (const [name, value] of Object.entries(fromApi.attributes)) {
    assert.equal(await text(`[data-testid=attributes] dd[data-key="${name}"]`), value);
  }
  await shot('card');

  await page.click('[data-testid=suspend]');
  await page.locator('[data-testid=reasons] li[data-key=manual]').waitFor();
  const after = await api('GET', `/cards/${card.iccid}`);
  assert.equal(after.state, 'suspended');
  assert.ok(after.reasons.includes('manual'), JSON.stringify(after.reasons));
  assert.match(await text('[data-testid=reasons] li[data-key=manual]'), /An operator suspended it/);
  // The suspend is the card's newest event, and why it is cut.
  const events = await newestEvents(`iccid=${card.iccid}`, 50);
  const cut = events.items[0];
  assert.equal(cut.event.kind, 'card_state');
  assert.equal(cut.event.new, 'suspended');
  assert.ok(cut.event.reasons.includes('manual'), JSON.stringify(cut.event));
  assert.equal(cut.event.cause.type, 'command');
  assert.equal(after.last_change.event_id, cut.event.id);
  await page.locator(`[data-testid=events] tr[data-key="${cut.position}"]`).waitFor();
  assert.deepEqual(await eventRows('events'), events.items.map((i) => i.position));
  const cutRow = `[data-testid=events] tr[data-key="${cut.position}"]`;
  assert.equal(await text(`${cutRow} [data-testid=kind]`), 'cut');
  assert.match(await text(`${cutRow} [data-testid=what]`), /→ suspended \(manual\)/);
  assert.equal(await text(`${cutRow} [data-testid=cause]`), `command ${cut.event.cause.command_id}`);
  assert.equal(await text('[data-testid=why-at]'), time(after.last_change.at));
  assert.equal(await text('[data-testid=why-detail]'), `command ${cut.event.cause.command_id}`);
  // The cut is marked on the chart at its event time.
  await page.waitForFunction(
    (t) => document.querySelector('[data-testid=usage-chart]')?.dataset.cut === t,
    String(Date.parse(cut.event.event_time) / 1000),
  );
  await shot('card-suspended');
  if (process.env.FLOWCAP_E2E_OUT) {
    writeFileSync(join(process.env.FLOWCAP_E2E_OUT, 'suspended.txt'), card.iccid);
  }
});

test("a bulk suspend shows each card's failure", async () => {
  // One card of the first page is deregistered first: a deregistered
  // card cannot be suspended, so the batch fails for it alone.
  const first = await api('GET', '/cards?limit=50');
  const victim = first.items[1];
  const summary = await api('GET', '/summary');
  const dereg = await api('POST', '/commands', {
    id: `e2e-dereg-${Date.now()}`,
    type: 'deregister',
    at: summary.clock,
    iccids: [victim.iccid],
  });
  assert.equal(dereg.result.ok, true, JSON.stringify(dereg));

  await open('/cards');
  await page.locator(`[data-testid=card-table] tr[data-key="${victim.iccid}"]`).waitFor();
  await page.check('[data-testid=select-all]');
  await page.click('[data-testid=bulk-suspend]');
  await page.locator('[data-testid=bulk-results]').waitFor();
  const rows = page.locator('[data-testid=bulk-failures] tbody tr');
  assert.equal(await rows.count(), 1);
  assert.equal(await rows.first().getAttribute('data-key'), victim.iccid);
  assert.match(await rows.first().innerText(), /invalid_state/);
  assert.equal(await text('[data-testid=bulk-failed]'), '1');
  assert.equal(await text('[data-testid=bulk-ok]'), String(first.items.length - 1));
  await shot('cards-bulk');

  // The page's answer is the engine's: the others are suspended now.
  const now = await api('GET', '/cards?limit=50');
  for (const c of now.items) {
    if (c.iccid === victim.iccid) assert.equal(c.state, 'deregistered');
    else assert.ok(c.reasons.includes('manual'), `${c.iccid}: ${JSON.stringify(c.reasons)}`);
  }
});

test('the cards list filters on the server and pages on', async () => {
  const fromApi = await api('GET', '/cards?reason=manual&limit=50');
  await open('/cards?reason=manual');
  await page.locator('[data-testid=card-table]').waitFor();
  const keys = await page.locator('[data-testid=card-table] tbody tr').evaluateAll((rows) =>
    rows.map((r) => r.dataset.key),
  );
  assert.deepEqual(keys, fromApi.items.map((c) => c.iccid));
  await shot('cards');
});

// A forward pool of five active cards that share carrier and plan (the
// generated workload has none), made through the API (admin scope).
async function makePool() {
  const cards = (await api('GET', '/cards?state=active&limit=1000')).items;
  const first = cards.find((c) => c.plan && c.usage_bytes > 0);
  const members = cards
    .filter((c) => c.carrier === first.carrier && c.plan === first.plan && !c.pool)
    .slice(0, 5)
    .map((c) => c.iccid);
  const { clock } = await api('GET', '/summary');
  const id = 'e2e-fleet';
  const made = await api('POST', '/commands', [
    {
      id: `e2e-pool-${Date.now()}`,
      type: 'create_pool',
      at: clock,
      pool: { id, kind: 'forward', name: 'E2E fleet', carrier: first.carrier, plan: first.plan },
    },
    { id: `e2e-members-${Date.now()}`, type: 'add_pool_members', at: clock, pool: id, iccids: members },
  ]);
  for (const item of made.items) assert.equal(item.result.ok, true, JSON.stringify(item));
  return id;
}

test("a pool's page shows the API's numbers", async () => {
  let pools = await api('GET', '/pools');
  if (pools.items.length === 0) {
    await makePool();
    pools = await api('GET', '/pools');
  }
  await open('/pools');
  await page.locator(`[data-testid=pools] tr[data-key="${pools.items[0].id}"]`).waitFor();
  await shot('pools');
  const pool = await api('GET', `/pools/${encodeURIComponent(pools.items[0].id)}?limit=50`);
  assert.ok(pool.member_count > 0);
  await open(`/pools/${encodeURIComponent(pool.id)}`);
  await page.locator('[data-testid=pool]').waitFor();
  assert.equal(await text('[data-testid=pool-used]'), bytes(pool.used_bytes));
  assert.equal(await text('[data-testid=pool-allowance]'), bytes(pool.allowance_bytes));
  assert.equal(await text('[data-testid=pool-members]'), count(pool.member_count));
  const top = await page.locator('[data-testid=top-consumers] tr').evaluateAll((rows) =>
    rows.map((r) => r.dataset.key),
  );
  assert.deepEqual(top, pool.top_consumers.map((c) => c.iccid));
  await shot('pool');
});

test('a pool in arrears shows as retained, with its events', async () => {
  // A backward pool of three active cards, frozen for arrears and then
  // retained (the arrears unpaid).
  const { clock } = await api('GET', '/summary');
  const id = 'e2e-arrears';
  const cards = (await api('GET', '/cards?state=active&limit=1000')).items.filter((c) => !c.pool);
  const members = cards.slice(-3).map((c) => c.iccid);
  const made = await api('POST', '/commands', [
    { id: `e2e-bpool-${Date.now()}`, type: 'create_pool', at: clock, pool: { id, kind: 'backward', name: 'E2E arrears' } },
    { id: `e2e-bmembers-${Date.now()}`, type: 'add_pool_members', at: clock, pool: id, iccids: members },
    { id: `e2e-freeze-${Date.now()}`, type: 'freeze_pool', at: clock, pool: id },
    { id: `e2e-retain-${Date.now()}`, type: 'retain_pool', at: clock, pool: id },
  ]);
  for (const item of made.items) assert.equal(item.result.ok, true, JSON.stringify(item));
  const pool = await api('GET', `/pools/${id}?limit=50`);
  assert.equal(pool.state, 'retained');
  const events = await newestEvents(`pool=${id}`, 50);
  assert.deepEqual(
    events.items.map((i) => `${i.event.old}>${i.event.new}`),
    ['frozen>retained', 'available>frozen'],
  );

  await open(`/pools/${id}`);
  await page.locator('[data-testid=pool]').waitFor();
  assert.equal(await text('[data-testid=pool-state]'), 'retained');
  assert.equal(await text('[data-testid=pool-state-words]'), POOL_STATES.retained);
  assert.equal(await text('[data-testid=retained-until]'), time(pool.retained_until));
  // Its own colour, not the default badge's.
  const colour = (sel) => page.locator(sel).first().evaluate((e) => getComputedStyle(e).backgroundColor);
  assert.equal(await colour('[data-testid=pool-state] .state'), 'rgb(255, 241, 229)');
  await page.locator('[data-testid=events] tbody tr').first().waitFor();
  assert.deepEqual(await eventRows('events'), events.items.map((i) => i.position));
  await shot('pool-arrears');

  // The overview lists it among the pools in arrears.
  await open('/');
  await page.locator(`[data-testid=pools-arrears] tr[data-key="${id}"]`).waitFor();
});

test("a rule's executions show the history's outcomes", async () => {
  const { clock } = await api('GET', '/summary');
  const rule = 'e2e-cut';
  await api('POST', '/commands', {
    id: `e2e-rule-${Date.now()}`,
    type: 'upsert_rule',
    at: clock,
    rule: { id: rule, name: 'Cards cut', type: 4, condition: { to: ['suspended'] } },
  });
  const active = (await api('GET', '/cards?state=active&limit=3')).items.map((c) => c.iccid);
  const cut = await api('POST', '/commands', { id: `e2e-cut-${Date.now()}`, type: 'suspend', at: clock, iccids: active });
  assert.equal(cut.result.ok, true, JSON.stringify(cut));
  // The firings are in the history once the command is answered.
  const executions = await api('GET', `/rules/${rule}/executions?limit=50`);
  assert.deepEqual(executions.items.map((e) => e.iccid).sort(), [...active].sort());

  await open('/rules');
  await page.locator(`[data-testid=rules] tr[data-key="${rule}"]`).waitFor();
  await shot('rules');
  await page.click(`[data-testid=rules] tr[data-key="${rule}"] a`);
  await page.locator('[data-testid=executions]').waitFor();
  const rows = await page
    .locator('[data-testid=executions] tbody tr')
    .evaluateAll((rows) => rows.map((r) => [r.dataset.key, r.querySelector('[data-testid=outcome]').innerText]));
  assert.deepEqual(rows, executions.items.map((e) => [e.execution_id, e.outcome]));
  await shot('rule');
});

test('the what-if form returns the cards of `flowcap rules replay`', async () => {
  assert.ok(process.env.FLOWCAP_BIN && process.env.FLOWCAP_DATA, 'set by flowcap/tests/console.rs');
  const { clock } = await api('GET', '/summary');
  const day = (ms) => new Date(ms + 8 * 3600 * 1000).toISOString().slice(0, 10);
  const to = day(Date.parse(clock));
  const from = day(Date.parse(clock) - 86400 * 1000);
  // The CLI, as a process, over the same history.
  const dir = mkdtempSync(join(tmpdir(), 'flowcap-whatif-'));
  const draftFile = join(dir, 'draft.toml');
  writeFileSync(draftFile, 'id = "e2e-draft"\ntype = 2\n[condition]\nused_mb_gte = 5\n');
  const printed = execFileSync(
    process.env.FLOWCAP_BIN,
    ['rules', 'replay', '--format', 'json', '--rule', draftFile, '--from', from, '--to', to, '--data', process.env.FLOWCAP_DATA],
    { encoding: 'utf8' },
  );
  const rows = printed.split('\n').filter(Boolean).map((l) => JSON.parse(l));
  const cards = [...new Set(rows.filter((r) => r.iccid).map((r) => r.iccid))].sort();
  assert.ok(cards.length > 0, 'the draft fires for some card');

  await open('/rules');
  await page.locator('[data-testid=what-if-form]').waitFor();
  const draft = { id: 'e2e-draft', type: 2, condition: { used_mb_gte: 5 } };
  await page.fill('textarea[name=draft]', JSON.stringify(draft, null, 2));
  await page.fill('input[name=from]', from);
  await page.fill('input[name=to]', to);
  await page.click('[data-testid=what-if-run]');
  await page.locator('[data-testid=what-if-answer]').waitFor({ timeout: 120_000 });
  const shown = await page.locator('[data-testid=what-if-cards] li').evaluateAll((li) => li.map((l) => l.dataset.key));
  assert.deepEqual(shown, cards);
  // Pools that fired (a card's row names its pool: not a pool firing).
  const pools = [...new Set(rows.filter((r) => !r.iccid && r.pool_id).map((r) => r.pool_id))].sort();
  const shownPools = await page.locator('[data-testid=what-if-pools] li').evaluateAll((li) => li.map((l) => l.dataset.key));
  assert.deepEqual(shownPools, pools);
  assert.equal(await text('[data-testid=what-if-firings]'), String(rows.length));
  await shot('what-if');
});

test('the dead letters page shows the quarantined input by reason', async () => {
  const all = await api('GET', '/dead-letters?limit=20');
  const reasons = Object.keys(all.reasons);
  assert.ok(reasons.length > 0 && all.items.length > 0);
  await open('/dead-letters');
  await page.locator('[data-testid=letters]').waitFor();
  for (const [reason, n] of Object.entries(all.reasons)) {
    assert.equal(await text(`[data-testid=letter-reasons] tr[data-key="${reason}"] [data-testid=n]`), count(n), reason);
  }
  const keys = () =>
    page.locator('[data-testid=letters] tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.key));
  assert.deepEqual(await keys(), all.items.map((l) => String(l.seq)));
  const first = all.items[0];
  assert.equal(
    await page.locator('[data-testid=letters] tbody tr [data-testid=raw]').first().textContent(),
    first.raw ?? `hex: ${first.raw_hex}`,
  );
  await shot('dead-letters');

  // The pager walks the server's pages, and back.
  assert.ok(all.next_cursor, 'more than a page of dead letters');
  const older = await api('GET', `/dead-letters?limit=20&cursor=${all.next_cursor}`);
  const shows = (items) =>
    page.waitForFunction(
      (w) => [...document.querySelectorAll('[data-testid=letters] tbody tr')].map((r) => r.dataset.key).join(',') === w,
      items.map((l) => String(l.seq)).join(','),
    );
  await page.getByRole('button', { name: 'Older →' }).click();
  await shows(older.items);
  await page.getByRole('button', { name: '← Newer' }).click();
  await shows(all.items);

  // One reason: the server filters.
  const reason = reasons[reasons.length - 1];
  const some = await api('GET', `/dead-letters?reason=${reason}&limit=20`);
  await page.click(`[data-testid=letter-reasons] tr[data-key="${reason}"] a`);
  await page.waitForURL(new RegExp(`reason=${reason}$`));
  const want = some.items.map((l) => String(l.seq)).join(',');
  await page.waitForFunction(
    (w) => [...document.querySelectorAll('[data-testid=letters] tbody tr')].map((r) => r.dataset.key).join(',') === w,
    want,
  );
  assert.ok(some.items.every((l) => l.reason === reason));
});
