// Operations (admins): latency, traffic, errors, cost and drift over time per model version, with
// the registry's version events marked on the time axis. Charts are inline SVG drawn here.
import { call } from "./api";
import { h, status } from "./dom";

type Point = { at: string; requests: number; errors: number; p50Ms: number | null; p95Ms: number | null; cost: number };
type ModelTimeline = { model: string; version: string; kind: string; status: string; points: Point[] };
type VersionEvent = { at: string; model: string; version: string; event: string };
type Timeline = {
  window: number; step: number; models: ModelTimeline[];
  errors: { code: string; points: { at: string; count: number }[] }[];
  versionEvents: VersionEvent[];
};
type DriftSignal = { name: string; value: number; threshold: number };
type Drift = { model: string; version: string; history: { at: string; signals: DriftSignal[] }[] };

/** One line of a chart: values at moments (ms since epoch); null is a gap. */
type Line = { name: string; color: string; dash?: boolean; values: [number, number | null][] };
type Span = { start: number; end: number; events: VersionEvent[] };

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#0b5fff", "#e36209", "#1a7f37", "#8250df", "#bf3989", "#0598bc", "#9a6700", "#57606a"];
const WIDTH = 520, HEIGHT = 200, LEFT = 52, RIGHT = 10, TOP = 10, BOTTOM = 26;
const WINDOWS: [string, number, number][] = [["5 minutes", 300, 10], ["15 minutes", 900, 10], ["1 hour", 3600, 60]];

const TIMELINE = `query($window: Int!, $step: Int!) { operationsTimeline(window: $window, step: $step) {
  window step
  models { model version kind status points { at requests errors p50Ms p95Ms cost } }
  errors { code points { at count } }
  versionEvents { at model version event } } }`;
const DRIFT = `query($model: String!) { modelDrift(model: $model) {
  model version history { at signals { name value threshold } } } }`;

function svg<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number>): SVGElementTagNameMap[K] {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  return el;
}

function short(value: number): string {
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 1000) return `${(value / 1000).toFixed(abs >= 10000 ? 0 : 1)}k`;
  if (abs >= 10) return value.toFixed(0);
  if (abs >= 1) return value.toFixed(1);
  return value.toPrecision(2);
}

function clock(ms: number): string {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

/** A line chart over the span, with the version events as dashed marks on the time axis. */
/** `base` set: a log-like scale (log(1 + v / base)) with a tick at `base`, so a threshold stays
 * readable under values many times over it (a PSI of 18 against 0.2). */
function chart(title: string, unit: string, lines: Line[], span: Span, empty = "No data in this window.", base?: number): HTMLElement {
  const figure = h("figure", { class: "chart" });
  const caption = h("figcaption", {}, title, h("span", { class: "unit" }, ` (${unit})`));
  // a line that stays at zero says nothing (a version that served nothing in the window)
  const shown = lines.filter((l) => l.values.some(([, v]) => v !== null && v !== 0));
  if (!shown.length) {
    figure.append(caption, h("p", { class: "muted empty" }, empty));
    return figure;
  }
  const top = Math.max(...shown.flatMap((l) => l.values.map(([, v]) => v ?? 0))) || 1;
  const x = (t: number) => LEFT + ((t - span.start) / Math.max(1, span.end - span.start)) * (WIDTH - LEFT - RIGHT);
  const scale = (v: number) => (base ? Math.log1p(v / base) / Math.log1p(top / base) : v / top);
  const y = (v: number) => TOP + (1 - scale(v)) * (HEIGHT - TOP - BOTTOM);
  const picture = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": `${title} (${unit})` });
  const ticks = base && base < top / 4 ? [0, base, Math.sqrt(base * top), top] : [0, top / 2, top];
  for (const tick of ticks) {
    picture.append(svg("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: y(tick), y2: y(tick), class: "grid" }));
    const label = svg("text", { x: LEFT - 4, y: y(tick) + 4, "text-anchor": "end", class: "axis" });
    label.textContent = short(tick);
    picture.append(label);
  }
  // time ticks on whole minutes (at most 6), so no label repeats or skips a minute
  const every = [1, 2, 5, 10, 15, 30, 60].map((m) => m * 60_000).find((ms) => (span.end - span.start) / ms <= 6) ?? 3_600_000;
  for (let t = Math.ceil(span.start / every) * every; t <= span.end; t += every) {
    const anchor = x(t) > WIDTH - RIGHT - 30 ? "end" : x(t) < LEFT + 30 ? "start" : "middle";
    const label = svg("text", { x: x(t), y: HEIGHT - 6, "text-anchor": anchor, class: "axis" });
    label.textContent = clock(t);
    picture.append(label);
  }
  // rollbacks last: on top of another change at the same moment (a rollback restores a shadow)
  const rollback = (e: VersionEvent) => Number(e.event.endsWith("rollback"));
  for (const event of [...span.events].sort((a, b) => rollback(a) - rollback(b))) {
    const at = Date.parse(event.at);
    if (at < span.start || at > span.end) continue;
    const mark = svg("g", { class: `event ${event.event}` });
    const title = svg("title", {});
    title.textContent = `${event.event}: ${event.model}@${event.version} at ${clock(at)}`;
    mark.append(title, svg("line", { x1: x(at), x2: x(at), y1: TOP, y2: HEIGHT - BOTTOM }),
      svg("path", { d: `M${x(at) - 4} ${TOP} h8 l-4 6 z` }));
    picture.append(mark);
  }
  for (const line of shown) {
    let d = "";
    // a point between gaps (a step with requests between idle ones) is a dot: a path of one
    // point draws nothing
    const dots: [number, number][] = [];
    line.values.forEach(([t, v], i) => {
      if (v === null) return;
      const joined = i > 0 && line.values[i - 1][1] !== null;
      d += `${joined ? "L" : "M"}${x(t).toFixed(1)} ${y(v).toFixed(1)}`;
      if (!joined && (line.values[i + 1]?.[1] ?? null) === null) dots.push([x(t), y(v)]);
    });
    const path = svg("path", { d, stroke: line.color, class: "series", "stroke-dasharray": line.dash ? "5 3" : "none" });
    const title = svg("title", {});
    title.textContent = line.name;
    path.append(title);
    picture.append(path);
    for (const [cx, cy] of dots) picture.append(svg("circle", { cx, cy, r: 2.5, fill: line.color }));
  }
  const legend = h("ul", { class: "legend", "aria-label": `${title}: series` },
    ...shown.map((l) => h("li", { style: `--c: ${l.color}`, class: l.dash ? "dash" : "" }, l.name)));
  figure.append(caption, picture, legend);
  return figure;
}

function versionLines(timeline: Timeline, value: (p: Point) => number | null, suffix = "", dash = false): Line[] {
  return timeline.models.map((m, i) => ({
    name: `${m.model}@${m.version}${suffix}`,
    color: COLORS[i % COLORS.length],
    dash,
    values: m.points.map((p) => [Date.parse(p.at), value(p)] as [number, number | null]),
  }));
}

// Whether this server's schema has no `modelDrift` (learnt from the first refusal): not asked again.
let noDriftField = false;

async function driftOf(model: string): Promise<Drift | null> {
  if (noDriftField) return null;
  try {
    return (await call<{ modelDrift: Drift }>(DRIFT, { model })).modelDrift;
  } catch (e) {
    if (String((e as Error).message).startsWith("GRAPHQL_VALIDATION_FAILED")) noDriftField = true;
    return null; // not on this server (yet), or nothing recorded for this version
  }
}

async function driftCharts(timeline: Timeline, span: Span): Promise<HTMLElement[]> {
  const live = timeline.models.filter((m) => m.status === "live");
  const first = live.length ? await driftOf(live[0].model) : null;
  const rest = await Promise.all(live.slice(1).map((m) => driftOf(m.model)));
  const charts: HTMLElement[] = [];
  [first, ...rest].forEach((drift, index) => {
    // the comparisons inside the window (history holds the last ones, however old)
    const history = (drift?.history ?? []).filter((s) => Date.parse(s.at) >= span.start);
    const of = (name: string, pick: (g: DriftSignal) => number) => history.map((s) => {
      const signal = s.signals.find((g) => g.name === name);
      return [Date.parse(s.at), signal ? pick(signal) : null] as [number, number | null];
    });
    // the signals that moved (a statistic that stays at zero says nothing), each with its
    // threshold, dashed; one threshold line for the signals that share it
    const names = [...new Set(history.flatMap((s) => s.signals.filter((g) => g.value > 0).map((g) => g.name)))];
    const values: Line[] = names.map((name, i) => ({ name, color: COLORS[i % COLORS.length], values: of(name, (g) => g.value) }));
    const thresholds = new Map<string, Line>();
    values.forEach((line) => {
      const points = of(line.name, (g) => g.threshold);
      const key = JSON.stringify(points.map(([, v]) => v));
      const shared = thresholds.get(key);
      if (shared) shared.name = "threshold";
      // drawn on to the window's end: the line a value is read against until the next comparison
      else thresholds.set(key, { name: `${line.name} threshold`, color: line.color, dash: true, values: [...points, [span.end, points[points.length - 1][1]]] });
    });
    if (thresholds.size === 1) [...thresholds.values()].forEach((l) => { l.name = "threshold"; l.color = "#b00020"; });
    const lines = [...values, ...thresholds.values()];
    const base = Math.min(...[...thresholds.values()].flatMap((l) => l.values.map(([, v]) => v ?? Infinity)));
    const version = live[index];
    if (values.length) charts.push(chart(`Drift: ${version.model}@${version.version}`, "statistic", lines, span, undefined, Number.isFinite(base) ? base : undefined));
  });
  // one figure says so when no live version has drift figures (or the server has no modelDrift)
  if (!charts.length) charts.push(chart("Drift", "statistic", [], span, "No drift data."));
  return charts;
}

async function draw(grid: HTMLElement, events: HTMLElement, note: HTMLElement, window: number, step: number) {
  status(note, "Loading…", "busy");
  const timeline = (await call<{ operationsTimeline: Timeline }>(TIMELINE, { window, step })).operationsTimeline;
  const end = Date.now();
  // a seed is the server registering what it serves at start: listed, not marked on the charts
  const marked = timeline.versionEvents.filter((e) => e.event !== "seed");
  const span: Span = { start: end - window * 1000, end, events: marked };
  const errorsAll: Line = {
    name: "errors (all versions)", color: "#b00020", dash: true,
    values: (timeline.models[0]?.points ?? []).map((p, i) =>
      [Date.parse(p.at), timeline.models.reduce((sum, m) => sum + (m.points[i]?.errors ?? 0), 0)]),
  };
  grid.replaceChildren(
    chart("Latency p95 (solid) and p50 (dashed)", "ms", [
      ...versionLines(timeline, (p) => p.p95Ms, " p95"),
      ...versionLines(timeline, (p) => p.p50Ms, " p50", true),
    ], span),
    chart("Requests and errors", `per ${step} s`, [...versionLines(timeline, (p) => p.requests), errorsAll], span),
    chart("Cost", `per ${step} s`, versionLines(timeline, (p) => p.cost), span),
    chart("Errors by code", `per ${step} s`, timeline.errors.map((e, i) => ({
      name: e.code, color: COLORS[(i + 3) % COLORS.length],
      values: e.points.map((p) => [Date.parse(p.at), p.count] as [number, number | null]),
    })), span, "No errors in this window."),
    ...(await driftCharts(timeline, span)),
  );
  events.replaceChildren(...timeline.versionEvents.slice(-12).reverse().map((e) =>
    h("li", { class: e.event }, h("time", { datetime: e.at }, clock(Date.parse(e.at))), ` ${e.event} `,
      h("code", {}, `${e.model}@${e.version}`))));
  status(note, timeline.models.length ? `${timeline.models.length} model versions, every ${step} s.` : "No model versions served yet.");
}

export function operationsPage(root: HTMLElement) {
  const note = h("p", { class: "status", role: "status" }, "Loading…");
  const grid = h("div", { class: "charts" });
  const events = h("ol", { class: "events", "aria-label": "Version events" });
  const choice = h("select", { id: "ops-window", "aria-label": "Window" },
    ...WINDOWS.map(([label, seconds]) => h("option", { value: String(seconds) }, label)));
  const refresh = () => {
    const [, window, step] = WINDOWS.find(([, s]) => String(s) === choice.value) ?? WINDOWS[0];
    draw(grid, events, note, window, step).catch((e) => status(note, (e as Error).message, "error"));
  };
  choice.addEventListener("change", refresh);
  const section = h("section", { class: "operations" }, h("h2", {}, "Operations"),
    h("div", { class: "row" }, h("label", { for: "ops-window", class: "check" }, "Last"), choice,
      h("button", { type: "button", class: "secondary", onclick: refresh }, "Refresh")),
    note, grid, h("h3", {}, "Version events"), events);
  root.replaceChildren(section);
  refresh();
  const timer = setInterval(() => (section.isConnected ? refresh() : clearInterval(timer)), 30_000);
}
