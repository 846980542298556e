// Dead letters: the quarantined input from the history, newest first,
// by reason, each with its raw input (bounded and with secrets redacted
// by the pipeline before it was written).
import { get } from './api.js';
import { count } from './format.js';
import { Failed, useCursors, useLoad } from './parts.jsx';
import { go, Link } from './router.jsx';

// Letters on a page (each may carry up to 64 KiB of raw input).
export const PAGE = 20;

export function DeadLetters({ query }) {
  const reason = query.get('reason') ?? '';
  const { cursor, reset, pager } = useCursors();
  const [page, error] = useLoad(() => {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (reason) q.set('reason', reason);
    if (cursor) q.set('cursor', cursor);
    return get(`/dead-letters?${q}`);
  }, [reason, cursor]);
  function pick(r) {
    reset();
    go(r ? `/dead-letters?reason=${encodeURIComponent(r)}` : '/dead-letters');
  }
  return (
    <div data-testid="dead-letters">
      <h1>Dead letters</h1>
      <Failed error={error} />
      {!page && !error && <p>Loading…</p>}
      {page && (
        <>
          <table data-testid="letter-reasons">
            <tbody>
              {Object.entries(page.reasons).map(([r, n]) => (
                <tr key={r} data-key={r} class={r === reason ? 'picked' : ''}>
                  <td><a href={`/ui/dead-letters?reason=${encodeURIComponent(r)}`} onClick={(e) => { e.preventDefault(); pick(r); }}>{r}</a></td>
                  <td class="num" data-testid="n">{count(n)}</td>
                </tr>
              ))}
            </tbody>
          </table>
          {reason && (
            <p>
              Reason <strong data-testid="reason">{reason}</strong> only ·{' '}
              <a href="/ui/dead-letters" onClick={(e) => { e.preventDefault(); pick(''); }}>every reason</a>
            </p>
          )}
          <table data-testid="letters">
            <thead>
              <tr><th class="num">Input</th><th>Day</th><th>Reason</th><th>Message</th><th>Card</th><th>Raw input</th></tr>
            </thead>
            <tbody>
              {page.items.map((l) => (
                <tr key={l.seq} data-key={l.seq}>
                  <td class="num">#{l.seq}</td>
                  <td class="nowrap">{l.date}</td>
                  <td>{l.reason}</td>
                  <td>{l.message}</td>
                  <td class="nowrap">{l.iccid ? <Link to={`/cards/${l.iccid}`}>{l.iccid}</Link> : '—'}</td>
                  <td class="rawcell"><pre class="raw" data-testid="raw">{l.raw ?? `hex: ${l.raw_hex}`}</pre></td>
                </tr>
              ))}
            </tbody>
          </table>
          {page.items.length === 0 && <p>No dead letter.</p>}
          {pager(page.next_cursor, '← Newer', 'Older →')}
        </>
      )}
    </div>
  );
}
