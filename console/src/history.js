// Which stretch of a card's history its page shows, anchored on the
// card's current cycle (the engine's event time), not on the browser's
// clock alone: a replayed or generated history lies in the past or the
// future, and its card pages still show it. Plain JS: the browser test
// imports it to ask the API for the same days.

const DAY_MS = 86400 * 1000;

// Today in UTC+8, YYYY-MM-DD.
export function today(nowMs = Date.now()) {
  return new Date(nowMs + 8 * 3600 * 1000).toISOString().slice(0, 10);
}

// The cycle (YYYY-MM) a local day belongs to: the calendar month, but
// cucc's runs from the 27th of the month before to the 26th (SPEC 3).
export function cycleOf(day, carrier) {
  const [y, m, d] = day.split('-').map(Number);
  const month = carrier === 'cucc' && d >= 27 ? m : m - 1;
  return new Date(Date.UTC(y, month, 1)).toISOString().slice(0, 7);
}

// The cycle `n` cycles before `cycle`.
export function cyclesBefore(cycle, n) {
  const [y, m] = cycle.split('-').map(Number);
  return new Date(Date.UTC(y, m - 1 - n, 1)).toISOString().slice(0, 7);
}

// The last local day of a cycle (the 26th for cucc).
function cycleEnd(cycle, carrier) {
  const [y, m] = cycle.split('-').map(Number);
  const end = carrier === 'cucc' ? Date.UTC(y, m - 1, 26) : Date.UTC(y, m, 0);
  return new Date(end).toISOString().slice(0, 10);
}

// The `n` days the daily bars show: ending today when today is in the
// card's cycle, else at the end of its cycle.
export function dayWindow(card, todayDay = today(), n = 60) {
  const end = cycleOf(todayDay, card.carrier) === card.cycle ? todayDay : cycleEnd(card.cycle, card.carrier);
  const endMs = Date.parse(`${end}T00:00:00Z`);
  const days = [];
  for (let i = n - 1; i >= 0; i -= 1) days.push(new Date(endMs - i * DAY_MS).toISOString().slice(0, 10));
  return days;
}
