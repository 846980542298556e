import { useEffect, useRef } from 'preact/hooks';
import uPlot from 'uplot';

const MB = 1024 * 1024;
const HOUR_MS = 3600 * 1000;

// The cycle YYYY-MM in UTC+8 as [start, end) in Unix seconds.
export function cycleBounds(cycle) {
  const [y, m] = cycle.split('-').map(Number);
  const start = Date.UTC(y, m - 1, 1) - 8 * HOUR_MS;
  const end = Date.UTC(y, m, 1) - 8 * HOUR_MS;
  return [start / 1000, end / 1000];
}

function utc8(secs) {
  const d = new Date(secs * 1000 + 8 * HOUR_MS).toISOString();
  return `${d.slice(5, 10)} ${d.slice(11, 16)}`;
}

// The day YYYY-MM-DD in UTC+8 as the Unix second it ends.
function dayEnd(day) {
  const [y, m, d] = day.split('-').map(Number);
  return (Date.UTC(y, m - 1, d + 1) - 8 * HOUR_MS) / 1000;
}

// Cumulative usage in the current cycle (MB) with the limit and threshold
// lines: 0 at the cycle's start, the history's daily sums added up at
// each day's end, and the live total last (at the last day's end, or now
// when the history has no day yet). Without history, the start and the
// total alone. `cut` (Unix seconds, optional): the cut, a red vertical
// line.
export function CycleChart({ card, days, cut }) {
  const box = useRef(null);
  useEffect(() => {
    const [start, end] = cycleBounds(card.cycle);
    const xs = [start];
    const used = [0];
    let sum = 0;
    for (const d of days ?? []) {
      const x = dayEnd(d.period);
      if (x <= start || x > end) continue;
      sum += d.bytes;
      xs.push(x);
      used.push(sum / MB);
    }
    const last = xs.length > 1 ? xs[xs.length - 1] : Math.min(Math.max(Date.now() / 1000, start), end);
    if (xs.length > 1) used[used.length - 1] = Math.max(used[used.length - 1], card.usage_bytes / MB);
    else {
      xs.push(last);
      used.push(card.usage_bytes / MB);
    }
    xs.push(end);
    used.push(null);
    const series = [{}, { label: 'Used (MB)', stroke: '#0969da', width: 2, points: { show: true, size: 6 } }];
    const data = [xs, used];
    if (card.limit_bytes !== null) {
      series.push({ label: 'Limit (MB)', stroke: '#cf222e', dash: [6, 4], points: { show: false } });
      data.push(xs.map(() => card.limit_bytes / MB));
    }
    if (card.threshold_mb >= 0) {
      series.push({ label: 'Threshold (MB)', stroke: '#bf8700', dash: [2, 3], points: { show: false } });
      data.push(xs.map(() => card.threshold_mb));
    }
    const plot = new uPlot(
      {
        width: 720,
        height: 260,
        series,
        scales: { x: { time: false }, y: { range: (_u, _min, max) => [0, Math.max(1, max * 1.1)] } },
        axes: [{ values: (_u, ticks) => ticks.map(utc8), space: 90 }, { label: 'MB' }],
        legend: { show: true },
        plugins: cut ? [cutLine(cut)] : [],
      },
      data,
      box.current,
    );
    return () => plot.destroy();
  }, [card.iccid, card.usage_bytes, card.limit_bytes, card.threshold_mb, card.cycle, days, cut]);
  return <div class="chart" ref={box} data-testid="usage-chart" data-cut={cut ?? ''} />;
}

// A vertical line at `at` (Unix seconds), labelled "cut".
function cutLine(at) {
  return {
    hooks: {
      draw: [
        (u) => {
          const x = u.valToPos(at, 'x', true);
          const { top, height } = u.bbox;
          const ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = '#cf222e';
          ctx.lineWidth = 2 * devicePixelRatio;
          ctx.setLineDash([]);
          ctx.beginPath();
          ctx.moveTo(x, top);
          ctx.lineTo(x, top + height);
          ctx.stroke();
          ctx.fillStyle = '#cf222e';
          ctx.font = `${12 * devicePixelRatio}px sans-serif`;
          ctx.fillText(`cut ${utc8(at)}`, x + 4 * devicePixelRatio, top + 14 * devicePixelRatio);
          ctx.restore();
        },
      ],
    },
  };
}
