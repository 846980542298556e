// Rules: the declared rules, one rule's executions with their delivery
// outcomes (from the history, in pages), and the what-if replay of a
// draft or declared rule over local days (POST /rules/what-if, the same
// replay as `flowcap rules replay`).
import { useState } from 'preact/hooks';
import { get, post } from './api.js';
import { time } from './format.js';
import { Failed, useCursors, useLoad } from './parts.jsx';
import { Link } from './router.jsx';

const EXAMPLE = '{\n  "id": "draft",\n  "type": 2,\n  "condition": { "used_mb_gte": 12 }\n}';

// The local day (UTC+8) `days` before now, YYYY-MM-DD.
function dayBefore(days) {
  return new Date(Date.now() + 8 * 3600 * 1000 - days * 86400 * 1000).toISOString().slice(0, 10);
}

export function Rules() {
  const [rules, error] = useLoad(() => get('/rules'), []);
  if (error) return <Failed error={error} />;
  if (!rules) return <p>Loading…</p>;
  return (
    <div data-testid="rules">
      <h1>Rules</h1>
      <table>
        <thead>
          <tr>
            <th>Rule</th><th>Name</th><th>Type</th><th>Enabled</th><th>Condition</th><th>Actions</th>
          </tr>
        </thead>
        <tbody>
          {rules.items.map((r) => (
            <tr key={r.id} data-key={r.id}>
              <td><Link to={`/rules/${encodeURIComponent(r.id)}`}>{r.id}</Link></td>
              <td>{r.name || '—'}</td>
              <td>{r.type}</td>
              <td>{r.enabled ? 'yes' : 'no'}</td>
              <td><code>{JSON.stringify(r.condition)}</code></td>
              <td>{(r.actions ?? []).map((a) => a.type).join(', ') || '—'}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {rules.items.length === 0 && <p>No rule is declared.</p>}
      <h2>What if: a draft rule</h2>
      <WhatIf />
    </div>
  );
}

// The what-if form: a draft (JSON) or, with `rule`, a declared rule.
export function WhatIf({ rule }) {
  const [draft, setDraft] = useState(EXAMPLE);
  const [from, setFrom] = useState(dayBefore(30));
  const [to, setTo] = useState(dayBefore(0));
  const [state, setState] = useState({});
  async function submit(e) {
    e.preventDefault();
    setState({ running: true });
    try {
      const body = { from, to };
      if (!rule) {
        try {
          body.rule = JSON.parse(draft);
        } catch (err) {
          throw new Error(`The draft is not JSON: ${err.message}`);
        }
      }
      const path = rule ? `/rules/${encodeURIComponent(rule)}/what-if` : '/rules/what-if';
      setState({ answer: await post(path, body) });
    } catch (error) {
      setState({ error });
    }
  }
  const a = state.answer;
  return (
    <div>
      <form class="filters" onSubmit={submit} data-testid="what-if-form">
        {!rule && (
          <label>
            Draft rule (JSON: id, type, condition, filter, actions)
            <textarea name="draft" rows="6" cols="48" value={draft} onInput={(e) => setDraft(e.currentTarget.value)} />
          </label>
        )}
        <label>
          From (UTC+8)
          <input name="from" type="date" value={from} onInput={(e) => setFrom(e.currentTarget.value)} />
        </label>
        <label>
          To, included
          <input name="to" type="date" value={to} onInput={(e) => setTo(e.currentTarget.value)} />
        </label>
        <button type="submit" class="primary" disabled={state.running} data-testid="what-if-run">
          {state.running ? 'Replaying…' : 'Replay'}
        </button>
      </form>
      <Failed error={state.error} />
      {a && (
        <div data-testid="what-if-answer">
          <p>
            Replayed {a.records} records and {a.commands} commands:{' '}
            {a.joined_at_input === null
              ? 'the rule never validated (does it name a pool, tag or webhook that never existed?).'
              : <>rule <strong>{a.rule}</strong> would have fired <strong data-testid="what-if-firings">{a.firings}</strong> time(s)
                for {a.cards.length} card(s) and {a.pools.length} pool(s).</>}
          </p>
          {a.cards.length > 0 && (
            <>
              <h2>Cards</h2>
              <ul class="chips" data-testid="what-if-cards">
                {a.cards.map((c) => (
                  <li key={c} data-key={c}><Link to={`/cards/${c}`}>{c}</Link></li>
                ))}
              </ul>
            </>
          )}
          {a.pools.length > 0 && (
            <>
              <h2>Pools</h2>
              <ul class="chips" data-testid="what-if-pools">
                {a.pools.map((p) => (
                  <li key={p} data-key={p}><Link to={`/pools/${encodeURIComponent(p)}`}>{p}</Link></li>
                ))}
              </ul>
            </>
          )}
          {a.items.length > 0 && (
            <>
              <h2>Firings{a.firings > a.items.length ? ` (the first ${a.items.length})` : ''}</h2>
              <table data-testid="what-if-items">
                <thead>
                  <tr><th>Fired (UTC+8)</th><th>Card or pool</th><th>Observed</th><th>Cause</th></tr>
                </thead>
                <tbody>
                  {a.items.map((f, i) => (
                    <tr key={i} data-key={f.iccid ?? f.pool_id}>
                      <td>{f.fired_at}</td>
                      <td>{f.iccid ?? f.pool_id}</td>
                      <td>{f.observed}</td>
                      <td>{f.cause} {f.cause_id}</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </>
          )}
        </div>
      )}
    </div>
  );
}

export function Rule({ id }) {
  const { cursor, pager } = useCursors();
  const [page, error] = useLoad(
    () => get(`/rules/${encodeURIComponent(id)}/executions?limit=50${cursor ? `&cursor=${cursor}` : ''}`),
    [id, cursor],
  );
  return (
    <div data-testid="rule">
      <h1>Rule {id}</h1>
      <p><Link to="/rules">All rules</Link></p>
      <h2>Executions, newest first</h2>
      <Failed error={error} />
      {!page && !error && <p>Loading…</p>}
      {page && (
        <>
          <table data-testid="executions">
            <thead>
              <tr>
                <th>Fired</th><th>Card or pool</th><th>Observed</th><th>Channel</th><th>Endpoint</th>
                <th>Outcome</th><th class="num">Attempts</th><th>Error</th><th>Done</th>
              </tr>
            </thead>
            <tbody>
              {page.items.map((e) => (
                <tr key={e.execution_id} data-key={e.execution_id}>
                  <td>{time(e.fired_at)}</td>
                  <td>
                    {e.iccid ? <Link to={`/cards/${e.iccid}`}>{e.iccid}</Link>
                      : e.pool_id ? <Link to={`/pools/${encodeURIComponent(e.pool_id)}`}>{e.pool_id}</Link> : '—'}
                  </td>
                  <td>{e.observed}</td>
                  <td>{e.channel}</td>
                  <td>{e.endpoint ?? '—'}</td>
                  <td data-testid="outcome">{e.outcome}</td>
                  <td class="num">{e.attempts}</td>
                  <td class="error">{e.error ?? ''}</td>
                  <td>{time(e.done_at)}</td>
                </tr>
              ))}
            </tbody>
          </table>
          {page.items.length === 0 && <p>No execution in the history.</p>}
          {pager(page.next_cursor, '← Newer', 'Older →')}
        </>
      )}
      <h2>What if it had been there from the start</h2>
      <WhatIf rule={id} />
    </div>
  );
}
