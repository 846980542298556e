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

// Usage in the current cycle (MB) with the limit and threshold lines.
// The API gives the cycle's total, not its history: the chart shows the
// start of the cycle (0) and the total now, not the curve between.
export function CycleChart({ card }) {
  const box = useRef(null);
  useEffect(() => {
    const [start, end] = cycleBounds(card.cycle);
    const now = Math.min(Math.max(Date.now() / 1000, start), end);
    const xs = [start, now, end];
    const used = card.usage_bytes / MB;
    const series = [{}];
    const data = [xs];
    series.push({ label: 'Used (MB)', stroke: '#0969da', width: 2, points: { show: true, size: 8 } });
    data.push([0, used, null]);
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
        axes: [
          { values: (_u, ticks) => ticks.map(utc8), space: 90 },
          { label: 'MB' },
        ],
        legend: { show: true },
      },
      data,
      box.current,
    );
    return () => plot.destroy();
  }, [card.iccid, card.usage_bytes, card.limit_bytes, card.threshold_mb, card.cycle]);
  return <div class="chart" ref={box} data-testid="usage-chart" />;
}
