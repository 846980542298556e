import { useState } from 'preact/hooks';
import { get } from './api.js';
import { cause, change, newest, what } from './events.js';
import { time } from './format.js';
import { Link } from './router.jsx';

// Events as a table, newest first: time (UTC+8), kind, subject, what
// happened and its cause (the record or command).
export function EventTable({ items, testid = 'events' }) {
  if (items.length === 0) return <p class="hint" data-testid={testid}>No event.</p>;
  return (
    <table data-testid={testid}>
      <thead>
        <tr>
          <th>Time</th><th>Kind</th><th>Card or pool</th><th>What</th><th>Cause</th>
        </tr>
      </thead>
      <tbody>
        {items.map(({ position, event: e }) => (
          <tr key={position} data-key={position} data-id={e.id}>
            <td class="nowrap">{time(e.event_time)}</td>
            <td>
              <span class={`kind ${change(e) ?? e.kind}`} data-testid="kind">
                {change(e) ?? e.kind.replace('_', ' ')}
              </span>
            </td>
            <td>
              {e.iccid && <Link to={`/cards/${e.iccid}`}>{e.iccid}</Link>}
              {e.iccid && e.pool && ' '}
              {e.pool && <Link to={`/pools/${encodeURIComponent(e.pool)}`}>{e.pool_name || e.pool}</Link>}
            </td>
            <td data-testid="what">{what(e)}</td>
            <td class="hint" data-testid="cause">{cause(e.cause)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

// The events `initial` began (the newest of `filter`, e.g. `iccid=...`),
// with a button for older ones. Give it `key={filter}`.
export function Timeline({ filter, initial }) {
  const [older, setOlder] = useState({ items: [], more: undefined, error: null });
  const items = [...initial.items, ...older.items];
  const more = older.more === undefined ? initial.more : older.more;
  async function loadOlder() {
    try {
      const page = await get(`/events?order=desc&limit=50&${filter}&cursor=${more}`);
      setOlder({ items: [...older.items, ...page.items], more: page.next_cursor, error: null });
    } catch (error) {
      setOlder({ ...older, error });
    }
  }
  return (
    <div>
      <EventTable items={items} />
      {more && (
        <div class="pager">
          <button data-testid="older-events" onClick={loadOlder}>Older events →</button>
          {older.error && <span class="error">{older.error.message}</span>}
        </div>
      )}
    </div>
  );
}

// The newest 50 events of `filter`.
export const loadTimeline = (filter) => newest(get, filter, 50, 4);
