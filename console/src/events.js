// Action events in words (GET /events: pages of {position, event}), and
// the newest ones of a filter. Pure functions: the browser test uses
// them too, so the pages and the test read the API the same way.

import { bytes } from './format.js';

// The newest `n` events of `filter` (a query string without `order`),
// newest first. One request scans a bounded part of the file, so a page
// may be short with a `next_cursor`; at most `tries` pages are read.
export async function newest(getJson, filter, n, tries = 8) {
  const items = [];
  let cursor = null;
  for (let i = 0; i < tries && items.length < n; i += 1) {
    const page = await getJson(
      `/events?order=desc&limit=${n - items.length}${filter ? `&${filter}` : ''}${cursor ? `&cursor=${cursor}` : ''}`,
    );
    items.push(...page.items);
    cursor = page.next_cursor;
    if (!cursor) break;
  }
  return { items, more: cursor };
}

// How many of the newest card state changes the overview shows.
export const LATEST = 20;

export const CAUSES = {
  record: 'a usage record',
  command: 'a command',
  rollover: 'a new billing cycle',
  deadline: 'a deadline',
};

export const DEADLINES = {
  plan_expiry: 'the plan expired',
  test_end: 'the test period ended',
  silent_end: 'the silent period ended',
  rule_day: 'a new day for the rules',
  expiry_grace_end: 'the grace period after expiry ended',
  retention_end: 'the pool’s retention ended',
};

// What caused an event, in words (the record or command named).
export function cause(c) {
  if (!c) return '—';
  switch (c.type) {
    case 'record':
      return `record ${c.record_id} of ${c.iccid}`;
    case 'command':
      return `command ${c.command_id}`;
    case 'rollover':
      return `cycle ${c.cycle} started`;
    case 'deadline':
      return DEADLINES[c.kind] ?? c.kind;
    default:
      return c.type;
  }
}

// A card_state event is a cut (into suspended), a restore (out of it)
// or another change.
export function change(e) {
  if (e.kind !== 'card_state') return null;
  if (e.new === 'suspended' && e.old !== 'suspended') return 'cut';
  if (e.old === 'suspended' && e.new !== 'suspended') return 'restore';
  return 'change';
}

// What happened, in words.
export function what(e) {
  switch (e.kind) {
    case 'card_state': {
      const reasons = e.reasons?.length ? ` (${e.reasons.join(', ')})` : '';
      const limit = e.limit_bytes != null ? `, ${bytes(e.usage_bytes)} used, limit ${bytes(e.limit_bytes)}` : '';
      return `${e.old} → ${e.new}${reasons}${limit}`;
    }
    case 'pool_state': {
      const limit = e.limit_bytes != null ? `, ${bytes(e.usage_bytes)} used, limit ${bytes(e.limit_bytes)}` : '';
      return `pool ${e.old} → ${e.new}${limit}`;
    }
    case 'rule_fired':
      return `rule ${e.rule_name || e.rule} fired`;
    case 'late_crossing':
      return `cycle ${e.cycle} (closed) crossed ${bytes(e.limit_bytes)} late (${(e.reasons ?? []).join(', ')})`;
    default:
      return e.kind;
  }
}

// The newest cut of `events` (newest first) inside [start, end) Unix
// seconds, as Unix seconds, or null.
export function lastCut(events, start, end) {
  for (const { event } of events) {
    if (change(event) !== 'cut') continue;
    const t = Date.parse(event.event_time) / 1000;
    if (t >= start && t < end) return t;
  }
  return null;
}
