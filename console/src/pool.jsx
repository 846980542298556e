import { get } from './api.js';
import { bytes, count, pct, POOL_STATES, time } from './format.js';
import { poolPct } from './overview.jsx';
import { Failed, PoolState, useCursors, useLoad } from './parts.jsx';
import { loadTimeline, Timeline } from './timeline.jsx';
import { Link } from './router.jsx';

export function Pools() {
  const [pools, error] = useLoad(() => get('/pools'), []);
  if (error) return <Failed error={error} />;
  if (!pools) return <p>Loading…</p>;
  return (
    <div data-testid="pools">
      <h1>Pools</h1>
      <table>
        <thead>
          <tr>
            <th>Pool</th><th>Kind</th><th>State</th><th class="num">Members</th>
            <th class="num">Used</th><th class="num">Allowance</th><th class="num">Used %</th>
          </tr>
        </thead>
        <tbody>
          {pools.items.map((p) => (
            <tr key={p.id} data-key={p.id}>
              <td><Link to={`/pools/${encodeURIComponent(p.id)}`}>{p.name || p.id}</Link></td>
              <td>{p.kind}</td>
              <td><PoolState state={p.state} /></td>
              <td class="num">{count(p.member_count)}</td>
              <td class="num">{bytes(p.used_bytes)}</td>
              <td class="num">{bytes(p.allowance_bytes)}</td>
              <td class="num">{pct(poolPct(p))}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {pools.items.length === 0 && <p>No pool.</p>}
    </div>
  );
}

export function Pool({ id }) {
  const { cursor, pager } = useCursors();
  const [pool, error] = useLoad(
    () => get(`/pools/${encodeURIComponent(id)}?limit=50${cursor ? `&cursor=${cursor}` : ''}`),
    [id, cursor],
  );
  if (error) return <Failed error={error} />;
  if (!pool) return <p>Loading…</p>;
  const p = poolPct(pool);
  return (
    <div data-testid="pool">
      <h1>Pool {pool.name || pool.id}</h1>
      <dl class="facts">
        <dt>Kind</dt><dd>{pool.kind}</dd>
        <dt>State</dt>
        <dd>
          <span data-testid="pool-state"><PoolState state={pool.state} /></span>{' '}
          <span class="hint" data-testid="pool-state-words">{POOL_STATES[pool.state] ?? ''}</span>
        </dd>
        {pool.retained_until && (<><dt>Retained until</dt><dd data-testid="retained-until">{time(pool.retained_until)}</dd></>)}
        {pool.abandoned_at && (<><dt>Abandoned</dt><dd data-testid="abandoned-at">{time(pool.abandoned_at)}</dd></>)}
        <dt>Carrier</dt><dd>{pool.carrier ?? '—'}</dd>
        <dt>Cycle</dt><dd>{pool.cycle}</dd>
        <dt>Used</dt><dd data-testid="pool-used">{bytes(pool.used_bytes)}</dd>
        <dt>Allowance</dt><dd data-testid="pool-allowance">{bytes(pool.allowance_bytes)}</dd>
        <dt>Remaining</dt><dd>{bytes(pool.remaining_bytes)}</dd>
        <dt>Used %</dt><dd>{pct(p)}</dd>
        <dt>Members</dt><dd data-testid="pool-members">{count(pool.member_count)}</dd>
      </dl>
      <h2>Top consumers this cycle</h2>
      <table data-testid="top-consumers">
        <tbody>
          {pool.top_consumers.map((c) => (
            <tr key={c.iccid} data-key={c.iccid}>
              <td><Link to={`/cards/${c.iccid}`}>{c.iccid}</Link></td>
              <td class="num">{bytes(c.used_bytes)}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <h2>Members</h2>
      <table data-testid="members">
        <tbody>
          {pool.members.items.map((m) => (
            <tr key={m}><td><Link to={`/cards/${m}`}>{m}</Link></td></tr>
          ))}
        </tbody>
      </table>
      {pager(pool.members.next_cursor, '← Previous', 'Next →')}
      <h2>Events</h2>
      <PoolEvents id={pool.id} />
    </div>
  );
}

// The pool's newest events: its state changes and the rule firings that
// name it.
function PoolEvents({ id }) {
  const filter = `pool=${encodeURIComponent(id)}`;
  const [events, error] = useLoad(() => loadTimeline(filter), [filter]);
  if (error) return <Failed error={error} />;
  if (!events) return <p>Loading…</p>;
  return <Timeline key={filter} filter={filter} initial={events} />;
}
