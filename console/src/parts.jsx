import { useEffect, useState } from 'preact/hooks';
import { bytes, pct, POOL_STATES } from './format.js';

// Loads `load()` again whenever `deps` change: [data, error, reload].
export function useLoad(load, deps) {
  const [state, setState] = useState({ data: null, error: null });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    setState((s) => ({ data: s.data, error: null }));
    load().then(
      (data) => live && setState({ data, error: null }),
      (error) => live && setState({ data: null, error }),
    );
    return () => {
      live = false;
    };
  }, [...deps, tick]);
  return [state.data, state.error, () => setTick((t) => t + 1)];
}

export function Failed({ error }) {
  return error ? <p class="error" data-testid="error">{error.message}</p> : null;
}

// used / limit as a bar; without a limit, the usage alone.
export function UsageBar({ used, limit, percent }) {
  if (limit === null || limit === undefined) {
    return <span class="barlabel" data-testid="usage">{bytes(used)} (no own limit)</span>;
  }
  const p = percent ?? 0;
  const cls = p >= 100 ? 'bar over' : p >= 80 ? 'bar warn' : 'bar';
  return (
    <span>
      <span class={cls} title={`${pct(p)} of ${bytes(limit)}`}>
        <span style={{ width: `${Math.min(100, p)}%` }} />
      </span>
      <span class="barlabel" data-testid="usage">
        {bytes(used)} / {bytes(limit)} ({pct(p)})
      </span>
    </span>
  );
}

export function State({ state }) {
  return <span class={`state ${state}`}>{state}</span>;
}

// A pool's state as a badge, its meaning as the tooltip.
export function PoolState({ state }) {
  return (
    <span class={`state pool-${state}`} title={POOL_STATES[state] ?? ''} data-testid="pool-state-badge">
      {state}
    </span>
  );
}

// Pages walked by cursor: a stack of the cursors shown so far ('' is the
// first page). `pager(next, back, forward)` draws the two buttons;
// `reset()` goes back to the first page.
export function useCursors() {
  const [cursors, setCursors] = useState(['']);
  return {
    cursor: cursors[cursors.length - 1],
    reset: () => setCursors(['']),
    pager: (next, back, forward) => (
      <div class="pager">
        <button disabled={cursors.length < 2} onClick={() => setCursors(cursors.slice(0, -1))}>{back}</button>
        <button disabled={!next} onClick={() => setCursors([...cursors, next])}>
          {forward}
        </button>
      </div>
    ),
  };
}
