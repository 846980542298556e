// Numbers for people: bytes as KB/MB/GB (1024-based, as the plans count
// MB), percentages, and times in UTC+8, the billing zone.

const UNITS = ['B', 'KB', 'MB', 'GB', 'TB'];

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  let v = Number(n);
  let u = 0;
  while (v >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u += 1;
  }
  const digits = u === 0 ? 0 : v < 10 ? 2 : v < 100 ? 1 : 0;
  return `${v.toFixed(digits)} ${UNITS[u]}`;
}

export function pct(p) {
  if (p === null || p === undefined) return '—';
  return `${Number(p).toFixed(1)} %`;
}

// Records a second, one decimal under 100.
export function rate(perSec) {
  const v = Number(perSec);
  return `${v < 100 ? v.toFixed(1) : Math.round(v).toLocaleString('en-US')}/s`;
}

export function count(n) {
  return Number(n).toLocaleString('en-US');
}

// An RFC 3339 time as `YYYY-MM-DD HH:MM UTC+8`.
export function time(text) {
  if (!text) return '—';
  const ms = Date.parse(text);
  if (Number.isNaN(ms)) return text;
  const local = new Date(ms + 8 * 3600 * 1000).toISOString();
  return `${local.slice(0, 10)} ${local.slice(11, 16)} UTC+8`;
}

export const REASONS = {
  over_quota: 'Used more than its plan plus add-ons this cycle.',
  over_threshold: 'Used more than the cut-off threshold set on it.',
  general_cap: 'General traffic above the 100 MB a cycle that general plans allow.',
  pool_exhausted: 'Its forward pool has used up the shared allowance.',
  backward_pool_threshold: 'A rule of its backward pool suspended it.',
  pool_frozen: 'Its backward pool is frozen for arrears.',
  plan_expired: 'Its plan expired without a renewal.',
  manual: 'An operator suspended it.',
  violation: 'The carrier reported a violation.',
};

export const STATES = {
  testable: 'Testing: not yet sold, may use the test allowance.',
  inactive: 'Not activated.',
  activatable: 'Ready to be activated.',
  active: 'Active: usage is counted against its plan.',
  suspended: 'Suspended: cut off for the reasons below.',
  deregistered: 'Deregistered for good.',
};

export const POOL_STATES = {
  available: 'Available: its members use the shared allowance.',
  exhausted: 'Exhausted: its members used up the shared allowance this cycle.',
  suspended: 'Suspended by a rule of the pool.',
  frozen: 'Frozen for arrears: its members are cut until they are paid.',
  retained: 'In arrears, retained: frozen, its numbers kept until the retention ends, then abandoned.',
  abandoned: 'Abandoned: it takes no member and no add-on any more.',
};
