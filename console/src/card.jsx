import { Fragment } from 'preact';
import { useRef, useState } from 'preact/hooks';
import { commandId, get, post } from './api.js';
import { cycleBounds, CycleChart } from './chart.jsx';
import { CAUSES, cause, DEADLINES, lastCut } from './events.js';
import { bytes, pct, REASONS, STATES, time } from './format.js';
import { cyclesBefore, dayWindow } from './history.js';
import { Failed, State, UsageBar, useLoad } from './parts.jsx';
import { Link } from './router.jsx';
import { loadTimeline, Timeline } from './timeline.jsx';

function Actions({ card, done }) {
  const [mb, setMb] = useState('');
  const [threshold, setThreshold] = useState('');
  const [outcome, setOutcome] = useState(null);
  async function run(what, send) {
    setOutcome(null);
    try {
      const answer = await send();
      const r = answer.result;
      const failure = r && !r.ok ? r.error ?? r.results?.find((x) => !x.ok)?.error : null;
      setOutcome(failure ? { what, error: { message: `${failure.code}: ${failure.message}` } } : { what, ok: answer.status });
      done();
    } catch (error) {
      setOutcome({ what, error });
    }
  }
  const at = card.iccid;
  return (
    <div>
      <div class="actions">
        <button class="danger" data-testid="suspend" onClick={() => run('suspend', () => post(`/cards/${at}/suspend`))}>
          Suspend
        </button>
        <button data-testid="resume" onClick={() => run('resume', () => post(`/cards/${at}/resume`))}>
          Resume
        </button>
        <span class="field">
          Add-on MB
          <input size="5" data-testid="addon-mb" value={mb} onInput={(e) => setMb(e.currentTarget.value)} />
        </span>
        <button
          data-testid="addon"
          disabled={!(Number(mb) > 0)}
          onClick={() => run('add-on', () => post(`/cards/${at}/add-on`, { mb: Number(mb) }))}
        >
          Buy add-on
        </button>
        <span class="field">
          Threshold MB (-1 none)
          <input size="5" data-testid="threshold-mb" value={threshold} onInput={(e) => setThreshold(e.currentTarget.value)} />
        </span>
        <button
          data-testid="set-threshold"
          disabled={threshold === '' || Number.isNaN(Number(threshold))}
          onClick={() =>
            run('threshold', async () => {
              const { clock } = await get('/summary');
              const n = Number(threshold);
              return post(
                '/commands',
                n < 0
                  ? { id: commandId('threshold'), type: 'clear_threshold', at: clock, iccids: [card.iccid] }
                  : { id: commandId('threshold'), type: 'set_threshold', at: clock, iccids: [card.iccid], mb: n },
              );
            })
          }
        >
          Set threshold
        </button>
      </div>
      {outcome?.error && <Failed error={outcome.error} />}
      {outcome?.ok && (
        <p class="ok" data-testid="action-ok">
          {outcome.what}: {outcome.ok}
        </p>
      )}
    </div>
  );
}

// Why the card is as it is: its last visible change (`last_change`),
// with the cause's details from that change's event when it is among
// the events shown.
function Why({ card, events }) {
  const change = card.last_change;
  if (!change) {
    return <p class="hint" data-testid="why">No state change recorded for this card.</p>;
  }
  const event = events?.items.find((i) => i.event.id === change.event_id)?.event;
  const kind = change.cause === 'deadline' ? DEADLINES[change.deadline] ?? change.deadline : CAUSES[change.cause] ?? change.cause;
  return (
    <p class={card.state === 'suspended' ? 'why' : 'why ok-why'} data-testid="why">
      <strong>Why {card.state}?</strong> Since <span data-testid="why-at">{time(change.at)}</span>, from{' '}
      {change.old}, caused by <span data-testid="why-cause">{kind}</span>
      {event ? <>: <span data-testid="why-detail">{cause(event.cause)}</span></> : ` (event ${change.event_id})`}.
    </p>
  );
}

// The card's usage history, or null when the server has none.
async function usage(iccid, query) {
  try {
    return (await get(`/cards/${encodeURIComponent(iccid)}/usage?${query}`)).items;
  } catch (_) {
    return null;
  }
}

function Cycles({ cycles }) {
  if (!cycles) return <p class="hint">No usage history on this server.</p>;
  const last = cycles.slice(-12);
  const top = Math.max(1, ...last.map((c) => c.bytes));
  return (
    <table data-testid="cycles">
      <tbody>
        {last.map((c) => (
          <tr key={c.period} data-key={c.period}>
            <td>{c.period}{c.live ? ' (live)' : ''}</td>
            <td>
              <span class="bar"><span style={{ width: `${(c.bytes * 100) / top}%` }} /></span>
            </td>
            <td class="num" data-testid="cycle-bytes">{bytes(c.bytes)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

function Days({ days, shown }) {
  if (!days) return <p class="hint">No usage history on this server.</p>;
  const byDay = new Map(days.map((d) => [d.period, d.bytes]));
  const top = Math.max(1, ...shown.map((d) => byDay.get(d) ?? 0));
  return (
    <div>
      <div class="days" data-testid="days">
        {shown.map((d) => {
          const b = byDay.get(d) ?? 0;
          return (
            <span
              key={d}
              data-key={d}
              data-bytes={bytes(b)}
              class={b ? '' : 'none'}
              style={{ height: `${Math.max(1, (b * 100) / top)}%` }}
              title={`${d}: ${bytes(b)}`}
            />
          );
        })}
      </div>
      <p class="hint">
        {shown[0]} to {shown[shown.length - 1]} (UTC+8), the history's daily sums; the highest day {bytes(top)}.
      </p>
    </div>
  );
}

// The history a card's page shows (null parts: no history on the
// server), asked for as soon as the card is known, before the page
// renders it; the page takes the last one asked.
let asked = { key: null, history: null };
const keyOf = (card) => `${card.iccid} ${card.carrier} ${card.cycle}`;

function ask(card) {
  const shown = dayWindow(card);
  // Only what the bars show: the history's older partitions are not read.
  const history = Promise.all([
    usage(card.iccid, `granularity=day&from=${shown[0]}&to=${shown[shown.length - 1]}`),
    usage(card.iccid, `granularity=cycle&from=${cyclesBefore(card.cycle, 11)}`),
  ]).then(([days, cycles]) => ({ days, cycles, shown }));
  asked = { key: keyOf(card), history };
  return history;
}

const historyOf = (card) => (asked.key === keyOf(card) ? asked.history : ask(card));

export function Card({ iccid }) {
  // The card's first load asks for its history; a reload after an
  // action does not (the bars do not change with a command).
  const opened = useRef(null);
  const [card, error, reload] = useLoad(async () => {
    const card = await get(`/cards/${encodeURIComponent(iccid)}`);
    if (opened.current !== iccid) {
      opened.current = iccid;
      ask(card);
    }
    return card;
  }, [iccid]);
  // The bars' stretch follows the card's cycle (see history.js).
  const [history] = useLoad(async () => (card ? historyOf(card) : null), [iccid, card?.cycle, card?.carrier]);
  // The card's events, read again with the card (a command adds some).
  const filter = `iccid=${encodeURIComponent(iccid)}`;
  const [events, eventsError] = useLoad(async () => (card ? loadTimeline(filter) : null), [filter, card]);
  if (error) return <Failed error={error} />;
  if (!card) return <p>Loading…</p>;
  const [start, end] = cycleBounds(card.cycle);
  const cut = events ? lastCut(events.items, start, end) : null;
  return (
    <div data-testid="card">
      <h1>
        Card <span data-testid="iccid">{card.iccid}</span> <State state={card.state} />
      </h1>
      <p data-testid="state-words">{STATES[card.state] ?? card.state}</p>
      {card.reasons.length > 0 && (
        <ul data-testid="reasons">
          {card.reasons.map((r) => (
            <li key={r} data-key={r}>
              <strong>{r}</strong>: {REASONS[r] ?? 'no description'}
            </li>
          ))}
        </ul>
      )}
      <Why card={card} events={events} />
      <Actions card={card} done={reload} />
      <h2>Usage in cycle {card.cycle}</h2>
      <p>
        <UsageBar used={card.usage_bytes} limit={card.limit_bytes} percent={card.usage_pct} />
      </p>
      <CycleChart card={card} days={history?.days} cut={cut} />
      <p class="hint">
        Daily sums from the history, the last point the live total; dashed: the limit and the threshold;
        red: the last cut in this cycle{cut ? ` (${time(new Date(cut * 1000).toISOString())})` : ', none'}.
      </p>
      <h2>Usage per day (last 60)</h2>
      {history ? <Days days={history.days} shown={history.shown} /> : <p>Loading…</p>}
      <h2>Usage per cycle (last 12)</h2>
      {history ? <Cycles cycles={history.cycles} /> : <p>Loading…</p>}
      <h2>Events</h2>
      <Failed error={eventsError} />
      {events ? <Timeline key={`${filter} ${card.position.seq}`} filter={filter} initial={events} /> : !eventsError && <p>Loading…</p>}
      <h2>Details</h2>
      <dl class="facts" data-testid="facts">
        <dt>Carrier</dt><dd>{card.carrier}</dd>
        <dt>Plan</dt><dd data-testid="plan">{card.plan ?? '—'} {card.traffic ? `(${card.traffic})` : ''}</dd>
        <dt>Used this cycle</dt><dd data-testid="used">{bytes(card.usage_bytes)}</dd>
        <dt>Limit</dt><dd data-testid="limit">{card.limit_bytes === null ? 'none of its own' : bytes(card.limit_bytes)}</dd>
        <dt>Remaining</dt><dd data-testid="remaining">{bytes(card.remaining_bytes)}</dd>
        <dt>Used %</dt><dd data-testid="pct">{pct(card.usage_pct)}</dd>
        <dt>Threshold</dt>
        <dd data-testid="threshold">
          {card.threshold_mb < 0 ? 'none' : card.threshold_mb === 0 ? 'cut at the first byte' : `${card.threshold_mb} MB`}
        </dd>
        <dt>Add-ons</dt><dd data-testid="addons">{card.addon_mb} MB</dd>
        <dt>Pool</dt>
        <dd>{card.pool ? <Link to={`/pools/${encodeURIComponent(card.pool)}`}>{card.pool}</Link> : '—'}</dd>
        <dt>Tags</dt><dd data-testid="tags">{card.tags.length ? card.tags.join(', ') : '—'}</dd>
        <dt>Attributes</dt>
        <dd data-testid="attributes">
          {Object.keys(card.attributes ?? {}).length === 0 ? '—' : (
            <dl class="attrs">
              {Object.entries(card.attributes).map(([k, v]) => (
                <Fragment key={k}>
                  <dt>{k}</dt>
                  <dd data-key={k}>{v}</dd>
                </Fragment>
              ))}
            </dl>
          )}
        </dd>
        <dt>IMEI</dt><dd data-testid="imei">{card.imei ?? '—'}</dd>
        <dt>MSISDN</dt><dd>{card.msisdn ?? '—'}</dd>
        <dt>IMSI</dt><dd>{card.imsi ?? '—'}</dd>
        <dt>Last record</dt><dd data-testid="last-record">{time(card.last_record_at)}</dd>
        <dt>Activated</dt><dd>{time(card.activated_at)}</dd>
        <dt>Plan expires</dt><dd>{time(card.expires_at)}</dd>
        <dt>As of input</dt><dd>#{card.position.seq ?? '—'}</dd>
      </dl>
    </div>
  );
}
