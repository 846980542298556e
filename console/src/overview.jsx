import { get } from './api.js';
import { LATEST, newest } from './events.js';
import { bytes, count, pct, POOL_STATES, rate, REASONS, time } from './format.js';
import { Failed, PoolState, useLoad } from './parts.jsx';
import { Link } from './router.jsx';
import { EventTable } from './timeline.jsx';

// Forward pools at or above this share of their allowance are "near".
const POOL_NEAR_PCT = 80;

export function poolPct(p) {
  return p.allowance_bytes ? (p.used_bytes * 100) / p.allowance_bytes : null;
}

export function Overview() {
  const [data, error] = useLoad(
    () => Promise.all([get('/summary'), get('/pools')]),
    [],
  );
  if (error) return <Failed error={error} />;
  if (!data) return <p>Loading…</p>;
  const [summary, pools] = data;
  const near = pools.items
    .filter((p) => p.state === 'exhausted' || (poolPct(p) ?? 0) >= POOL_NEAR_PCT)
    .sort((a, b) => (poolPct(b) ?? 0) - (poolPct(a) ?? 0));
  const arrears = pools.items.filter((p) => p.state === 'frozen' || p.state === 'retained');
  return (
    <div data-testid="overview">
      <h1>Overview</h1>
      <p class="hint">
        Live state at input #{summary.position.seq ?? '—'}, event clock {time(summary.clock)}.
      </p>
      <div class="tiles">
        <div class="tile">
          <div>Cards</div>
          <div class="big" data-testid="cards-total">{count(summary.cards)}</div>
        </div>
        <div class="tile">
          <div>
            <Link to="/cards?usage_pct_gte=80">At ≥ 80 % of their limit</Link>
          </div>
          <div class="big" data-testid="cards-80">{count(summary.cards_at_80_pct)}</div>
        </div>
        <div class="tile">
          <div>
            <Link to="/cards?usage_pct_gte=90">At ≥ 90 % of their limit</Link>
          </div>
          <div class="big" data-testid="cards-90">{count(summary.cards_at_90_pct)}</div>
        </div>
      </div>
      <h2>Cards by state</h2>
      <table data-testid="by-state">
        <tbody>
          {Object.entries(summary.cards_by_state).map(([state, n]) => (
            <tr key={state} data-key={state}>
              <td>
                <Link to={`/cards?state=${state}`}>{state}</Link>
              </td>
              <td class="num" data-testid="n">{count(n)}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <h2>Suspended cards by reason</h2>
      {Object.keys(summary.cards_by_reason).length === 0 ? (
        <p>No card is suspended.</p>
      ) : (
        <table data-testid="by-reason">
          <tbody>
            {Object.entries(summary.cards_by_reason).map(([reason, n]) => (
              <tr key={reason} data-key={reason}>
                <td>
                  <Link to={`/cards?reason=${reason}`}>{reason}</Link>
                </td>
                <td class="hint">{REASONS[reason] ?? ''}</td>
                <td class="num" data-testid="n">{count(n)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      <h2>Pools near exhaustion</h2>
      {near.length === 0 ? (
        <p data-testid="pools-near">No pool at ≥ {POOL_NEAR_PCT} % of its allowance.</p>
      ) : (
        <table data-testid="pools-near">
          <thead>
            <tr>
              <th>Pool</th>
              <th>State</th>
              <th class="num">Used</th>
              <th class="num">Allowance</th>
              <th class="num">Used %</th>
            </tr>
          </thead>
          <tbody>
            {near.map((p) => (
              <tr key={p.id} data-key={p.id}>
                <td>
                  <Link to={`/pools/${encodeURIComponent(p.id)}`}>{p.name || p.id}</Link>
                </td>
                <td><PoolState state={p.state} /></td>
                <td class="num">{bytes(p.used_bytes)}</td>
                <td class="num">{bytes(p.allowance_bytes)}</td>
                <td class="num">{pct(poolPct(p))}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      <h2>Pools in arrears</h2>
      {arrears.length === 0 ? (
        <p data-testid="pools-arrears">No pool is frozen or retained for arrears.</p>
      ) : (
        <table data-testid="pools-arrears">
          <tbody>
            {arrears.map((p) => (
              <tr key={p.id} data-key={p.id}>
                <td>
                  <Link to={`/pools/${encodeURIComponent(p.id)}`}>{p.name || p.id}</Link>
                </td>
                <td><PoolState state={p.state} /></td>
                <td class="hint">{POOL_STATES[p.state]}</td>
                <td class="num">{count(p.member_count)} cards</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      <Ingestion />
      <LatestChanges />
    </div>
  );
}

// The newest card_state events: cuts, restores and other changes, each
// linking to its card (the events committed so far).
function LatestChanges() {
  const [latest, error] = useLoad(() => newest(get, 'kind=card_state', LATEST), []);
  return (
    <div>
      <h2>Latest cuts and restores</h2>
      <Failed error={error} />
      {latest ? <EventTable items={latest.items} testid="latest-changes" /> : !error && <p>Loading…</p>}
      <p class="hint">The newest {LATEST} card state changes whose input is committed, newest first.</p>
    </div>
  );
}

// Records read, dead letters and Kafka lag over the last hour, per
// minute (GET /ingestion: this process's counters, read each minute).
export function Ingestion() {
  const [data, error] = useLoad(() => get('/ingestion'), []);
  if (error) return <Failed error={error} />;
  if (!data) return <p>Loading…</p>;
  const last = data.minutes[data.minutes.length - 1];
  const top = Math.max(1, ...data.minutes.map((m) => m.records));
  return (
    <div data-testid="ingestion">
      <h2>Ingestion, last hour</h2>
      <div class="tiles">
        <div class="tile">
          <div>Records read</div>
          <div class="big" data-testid="ingested">{count(data.records)}</div>
        </div>
        <div class="tile">
          <div>Rate, last minute</div>
          <div class="big" data-testid="rate">{last ? rate(last.records_per_sec) : '—'}</div>
        </div>
        <div class="tile">
          <div><Link to="/dead-letters">Dead letters</Link></div>
          <div class="big" data-testid="dead">{count(data.dead_letters)}</div>
        </div>
        <div class="tile">
          <div>Consumer lag</div>
          <div class="big" data-testid="lag">{data.lag === null ? '—' : count(data.lag)}</div>
          {data.lag === null && <div class="hint">not reading Kafka</div>}
        </div>
      </div>
      <div class="spark" data-testid="minutes" title="records per minute">
        {data.minutes.map((m) => (
          <span
            key={m.start}
            data-key={m.start}
            class={m.dead_letters > 0 ? 'dead' : ''}
            style={{ height: `${Math.max(1, (m.records * 100) / top)}%` }}
            title={`${time(m.start)}: ${count(m.records)} records, ${count(m.dead_letters)} dead letters`}
          />
        ))}
      </div>
      <p class="hint">Each bar is a minute (the last one up to now), since this process started.</p>
    </div>
  );
}
