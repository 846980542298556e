import { useState } from 'preact/hooks';
import { commandId, get, post } from './api.js';
import { Failed, State, UsageBar, useLoad } from './parts.jsx';
import { go, Link } from './router.jsx';

const FILTERS = ['iccid_prefix', 'state', 'reason', 'carrier', 'plan', 'pool', 'tag', 'usage_pct_gte'];
const STATES = ['testable', 'inactive', 'activatable', 'active', 'suspended', 'deregistered'];
const REASONS = [
  'over_quota', 'over_threshold', 'general_cap', 'pool_exhausted',
  'backward_pool_threshold', 'pool_frozen', 'plan_expired', 'manual', 'violation',
];
const CARRIERS = ['cmcc', 'cucc', 'ctcc', 'tri'];
const PAGE = 50;

function Choice({ name, value, options, onChange }) {
  return (
    <label>
      {name}
      <select name={name} value={value ?? ''} onChange={(e) => onChange(e.currentTarget.value)}>
        <option value="">any</option>
        {options.map((o) => (
          <option key={o} value={o}>{o}</option>
        ))}
      </select>
    </label>
  );
}

// Sends one batch command over the selected cards and shows each card's
// outcome (SPEC 5.1: a batch reports per card).
function Bulk({ selected, tags, done }) {
  const [tag, setTag] = useState('');
  const [outcome, setOutcome] = useState(null);
  const [busy, setBusy] = useState(false);
  async function send(type, extra = {}) {
    setBusy(true);
    setOutcome(null);
    try {
      const { clock } = await get('/summary');
      const answer = await post('/commands', {
        id: commandId(type),
        type,
        at: clock,
        iccids: [...selected],
        ...extra,
      });
      setOutcome({ type, answer });
      done();
    } catch (error) {
      setOutcome({ type, error });
    }
    setBusy(false);
  }
  const result = outcome?.answer?.result;
  const failed = result?.results?.filter((r) => !r.ok) ?? [];
  const ok = result?.results?.filter((r) => r.ok).length ?? 0;
  return (
    <div>
      <div class="actions" data-testid="bulk">
        <span>{selected.size} selected</span>
        <button disabled={!selected.size || busy} onClick={() => send('suspend')} data-testid="bulk-suspend">
          Suspend
        </button>
        <button disabled={!selected.size || busy} onClick={() => send('resume')} data-testid="bulk-resume">
          Resume
        </button>
        <select value={tag} onChange={(e) => setTag(e.currentTarget.value)} data-testid="bulk-tag-name">
          <option value="">tag…</option>
          {tags.map((t) => (
            <option key={t.name} value={t.name}>{t.name}</option>
          ))}
        </select>
        <button
          disabled={!selected.size || !tag || busy}
          onClick={() => send('bind_tags', { tags: [tag] })}
          data-testid="bulk-tag"
        >
          Add tag
        </button>
      </div>
      {outcome?.error && <Failed error={outcome.error} />}
      {result && (
        <div class="results" data-testid="bulk-results">
          <p>
            {outcome.type}: <span class={result.ok ? 'ok' : 'error'}>{result.ok ? 'done' : 'not all done'}</span>,{' '}
            <span data-testid="bulk-ok">{ok}</span> cards ok, <span data-testid="bulk-failed">{failed.length}</span>{' '}
            failed{result.error ? ` (${result.error.code}: ${result.error.message})` : ''}.
          </p>
          {failed.length > 0 && (
            <table data-testid="bulk-failures">
              <thead>
                <tr>
                  <th>ICCID</th>
                  <th>Error</th>
                </tr>
              </thead>
              <tbody>
                {failed.map((r) => (
                  <tr key={r.iccid} data-key={r.iccid}>
                    <td>{r.iccid}</td>
                    <td>
                      {r.error?.code}: {r.error?.message}
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
        </div>
      )}
    </div>
  );
}

export function Cards({ query }) {
  const filters = Object.fromEntries(FILTERS.map((k) => [k, query.get(k) ?? '']));
  const cursor = query.get('cursor');
  const [back, setBack] = useState([]);
  const [selected, setSelected] = useState(new Set());
  const [draft, setDraft] = useState(filters);
  const params = new URLSearchParams({ limit: String(PAGE) });
  for (const [k, v] of Object.entries(filters)) if (v) params.set(k, v);
  if (cursor) params.set('cursor', cursor);
  const [data, error, reload] = useLoad(
    () => Promise.all([get(`/cards?${params}`), get('/plans'), get('/pools'), get('/tags')]),
    [params.toString()],
  );
  function apply(next, extra = '') {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(next)) if (v) q.set(k, v);
    setSelected(new Set());
    go(`/cards?${q}${extra}`);
  }
  const set = (k) => (v) => setDraft({ ...draft, [k]: v });
  const [page, plans, pools, tags] = data ?? [null, { items: [] }, { items: [] }, { items: [] }];
  const toggle = (iccid) => {
    const next = new Set(selected);
    if (next.has(iccid)) next.delete(iccid);
    else next.add(iccid);
    setSelected(next);
  };
  return (
    <div data-testid="cards">
      <h1>Cards</h1>
      <form
        class="filters"
        onSubmit={(e) => {
          e.preventDefault();
          setBack([]);
          apply(draft);
        }}
      >
        <label>
          ICCID prefix
          <input name="iccid_prefix" value={draft.iccid_prefix} onInput={(e) => set('iccid_prefix')(e.currentTarget.value)} />
        </label>
        <Choice name="state" value={draft.state} options={STATES} onChange={set('state')} />
        <Choice name="reason" value={draft.reason} options={REASONS} onChange={set('reason')} />
        <Choice name="carrier" value={draft.carrier} options={CARRIERS} onChange={set('carrier')} />
        <Choice name="plan" value={draft.plan} options={plans.items.map((p) => p.id)} onChange={set('plan')} />
        <Choice name="pool" value={draft.pool} options={pools.items.map((p) => p.id)} onChange={set('pool')} />
        <Choice name="tag" value={draft.tag} options={tags.items.map((t) => t.name)} onChange={set('tag')} />
        <label>
          usage ≥ %
          <input name="usage_pct_gte" size="4" value={draft.usage_pct_gte} onInput={(e) => set('usage_pct_gte')(e.currentTarget.value)} />
        </label>
        <button type="submit" class="primary" data-testid="apply">Filter</button>
      </form>
      <Bulk selected={selected} tags={tags.items} done={reload} />
      <Failed error={error} />
      {!page ? (
        <p>Loading…</p>
      ) : (
        <>
          <table data-testid="card-table">
            <thead>
              <tr>
                <th>
                  <input
                    type="checkbox"
                    data-testid="select-all"
                    checked={page.items.length > 0 && page.items.every((c) => selected.has(c.iccid))}
                    onChange={(e) =>
                      setSelected(e.currentTarget.checked ? new Set(page.items.map((c) => c.iccid)) : new Set())
                    }
                  />
                </th>
                <th>ICCID</th>
                <th>Carrier</th>
                <th>Plan</th>
                <th>State</th>
                <th>Usage this cycle</th>
                <th>Pool</th>
                <th>Tags</th>
              </tr>
            </thead>
            <tbody>
              {page.items.map((c) => (
                <tr key={c.iccid} data-key={c.iccid}>
                  <td>
                    <input type="checkbox" checked={selected.has(c.iccid)} onChange={() => toggle(c.iccid)} />
                  </td>
                  <td>
                    <Link to={`/cards/${c.iccid}`}>{c.iccid}</Link>
                  </td>
                  <td>{c.carrier}</td>
                  <td>{c.plan ?? '—'}</td>
                  <td>
                    <State state={c.state} />{' '}
                    {c.reasons.map((r) => (
                      <span class="reason" key={r}>{r}</span>
                    ))}
                  </td>
                  <td>
                    <UsageBar used={c.usage_bytes} limit={c.limit_bytes} percent={c.usage_pct} />
                  </td>
                  <td>{c.pool ? <Link to={`/pools/${encodeURIComponent(c.pool)}`}>{c.pool}</Link> : '—'}</td>
                  <td>{c.tags.join(', ')}</td>
                </tr>
              ))}
            </tbody>
          </table>
          {page.items.length === 0 && <p>No card matches.</p>}
          <div class="pager">
            <button
              disabled={back.length === 0}
              onClick={() => {
                const prev = back[back.length - 1];
                setBack(back.slice(0, -1));
                apply(filters, prev ? `&cursor=${prev}` : '');
              }}
            >
              ← Previous
            </button>
            <button
              disabled={!page.next_cursor}
              data-testid="next-page"
              onClick={() => {
                setBack([...back, cursor ?? '']);
                apply(filters, `&cursor=${page.next_cursor}`);
              }}
            >
              Next →
            </button>
            <span class="hint">{PAGE} a page, in ICCID order.</span>
          </div>
        </>
      )}
    </div>
  );
}
