// The Drover dashboard: fetches the head's JSON views and redraws them when the SSE
// stream says they changed. No framework, no build step: the head serves this file as is.
const SVG = "http://www.w3.org/2000/svg";

function element(tag, attributes = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) if (value !== undefined) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJson(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) throw new Error("unauthorized: open the address `drover dashboard` prints");
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

const percent = (ratio) => (ratio === undefined ? "n/a" : `${Math.round(ratio * 100)}%`);
const minutes = (value) => (value < 120 ? `${value.toFixed(1)} min` : `${(value / 60).toFixed(1)} h`);
const gib = (bytes) => (bytes === undefined ? "n/a" : `${(bytes / 2 ** 30).toFixed(1)} GiB`);

/** A small line of `points` ([time, value]) scaled into width x height. */
function sparkline(points, { width = 110, height = 22, min, max, cls }) {
  const svg = element("svg:svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: cls });
  if (points.length === 0) return svg;
  const values = points.map((point) => point[1]);
  const low = min ?? Math.min(...values);
  const high = Math.max(max ?? -Infinity, ...values, low + 1e-9);
  const first = points[0][0];
  const span = Math.max(points[points.length - 1][0] - first, 1);
  const coords = points.map(([time, value]) => `${(((time - first) / span) * (width - 2) + 1).toFixed(1)},${(height - 1 - ((value - low) / (high - low)) * (height - 2)).toFixed(1)}`);
  svg.append(element("svg:polyline", { points: coords.join(" "), fill: "none", stroke: "#2364d2", "stroke-width": 1.2 }));
  return svg;
}

function renderCluster(view) {
  const root = document.getElementById("cluster");
  root.replaceChildren();
  if (view.groups.length === 0) root.append(element("div", { class: "muted" }, "no nodes registered yet"));
  for (const group of view.groups) {
    const box = element("div", { class: "group", "data-group": group.name });
    box.append(element("h3", {}, `group ${group.name} (${group.nodes.length} node${group.nodes.length === 1 ? "" : "s"})`));
    for (const node of group.nodes) {
      const row = element("div", { class: "node", "data-node": node.name, "data-connection": node.connection });
      const title = element("div");
      title.append(element("span", { class: "node-name" }, node.name), element("span", { class: `connection ${node.connection}` }, node.connection));
      title.append(element("span", { class: "muted" }, `  cpu ${percent(node.cpuUtilization)}, memory ${gib(node.memoryUsedBytes)} / ${gib(node.memoryTotalBytes)}`));
      row.append(title);
      if (node.gpus.length === 0) row.append(element("div", { class: "muted" }, "no GPU telemetry"));
      for (const gpu of node.gpus) {
        const latestUtilization = gpu.utilization.at(-1)?.[1];
        const latestTemperature = gpu.temperature.at(-1)?.[1];
        const line = element("div", { class: "gpu", "data-gpu": gpu.index });
        line.append(
          element("span", {}, `GPU ${gpu.index}`),
          element("span", {}, `util ${percent(latestUtilization)}`),
          sparkline(gpu.utilization, { min: 0, max: 1, cls: "utilization-sparkline" }),
          element("span", {}, `${latestTemperature === undefined ? "n/a" : `${latestTemperature} °C`}`),
          sparkline(gpu.temperature, { width: 80, cls: "temperature-sparkline" }),
        );
        row.append(line);
      }
      box.append(row);
    }
    root.append(box);
  }
  renderCost(view.cost);
  renderAlerts(view.alerts ?? []);
}

/** The head's current alerts, as `drover status` prints them. */
function renderAlerts(alerts) {
  const root = document.getElementById("alerts");
  root.replaceChildren();
  if (alerts.length === 0) return;
  root.append(element("h3", {}, "Alerts"));
  for (const alert of alerts) root.append(element("div", { class: "alert", "data-kind": alert.kind, "data-node": alert.node }, `warning: ${alert.message}`));
}

function renderCost(cost) {
  const root = document.getElementById("cost");
  root.replaceChildren();
  // Local nodes without cost.pricePerNodeHour are priced at nothing: no section for them.
  if (!cost || cost.leases.length + cost.nodes.length === 0) return;
  root.append(element("h3", {}, "Spend"));
  const table = element("table", { class: "cost" });
  for (const lease of cost.leases) {
    const row = element("tr");
    // The escrow left, and how long it lasts at the measured block time (cost.json's escrowMinutesLeft).
    const escrow = lease.escrowLeft === undefined ? "" : `; escrow left ${lease.escrowLeft} ${lease.denom}${lease.escrowMinutesLeft === undefined ? "" : ` (~${minutes(lease.escrowMinutesLeft)})`}`;
    row.append(element("td", {}, `lease ${lease.group} dseq ${lease.dseq}`), element("td", {}, `${lease.spent} ${lease.denom}`), element("td", { class: "lease-burn" }, `${lease.burnPerHour} ${lease.denom}/h${escrow}`));
    table.append(row);
  }
  for (const node of cost.nodes) {
    const row = element("tr");
    row.append(element("td", {}, `node ${node.node}`), element("td", {}, `${node.spent} ${node.denom}`), element("td", {}, `${node.burnPerHour} ${node.denom}/h`));
    table.append(row);
  }
  for (const total of cost.totals) {
    const row = element("tr");
    const per = [total.per1kImages ? `per 1k images ${total.per1kImages}` : "", total.perCheckpoint ? `per checkpoint ${total.perCheckpoint}` : ""].filter(Boolean).join(", ");
    row.append(element("th", {}, "total"), element("th", {}, `${total.spent} ${total.denom}`), element("th", {}, `${total.burnPerHour} ${total.denom}/h${per ? `; ${per}` : ""}`));
    table.append(row);
  }
  root.append(table);
}

function renderJob(view) {
  const root = document.getElementById("job");
  root.replaceChildren();
  const chart = document.getElementById("loss-chart");
  chart.replaceChildren();
  if (!view.job) {
    root.append(element("div", { class: "muted" }, "no job yet: drover submit -- CMD"));
    return;
  }
  const job = view.job;
  const facts = element("div", { class: "facts", "data-job": job.jobId, "data-state": job.state });
  const fact = (label, value) => {
    const span = element("span", {}, `${label} `);
    span.append(element("b", {}, value === undefined ? "n/a" : String(value)));
    facts.append(span);
  };
  fact("job", job.jobId);
  fact("run", job.runId);
  fact("state", job.state);
  fact("attempt", job.attempt);
  fact("restarts", view.restarts.length);
  fact("step", job.latestStep);
  fact("img/s", job.imagesPerSecond === undefined ? undefined : job.imagesPerSecond.toFixed(1));
  // MFU only from a trainer that reports it (examples/at1 does when it knows the GPU's peak).
  if (job.mfu !== undefined) fact("MFU", percent(job.mfu));
  // Outer steps sync the job's groups (DiLoCo): shown when there are any.
  if (view.outerSteps.length > 0) fact(`outer step (${view.groups.length} groups)`, job.lastOuterStep);
  fact("committed", job.lastCommittedStep);
  root.append(facts);
  if (job.failure) root.append(element("div", { class: "muted" }, `failure: ${job.failure}`));
  drawLossChart(chart, view);
  if (view.mfu.length > 0) {
    const line = element("div", { class: "mfu", "data-points": view.mfu.length });
    line.append(element("span", { class: "muted" }, "MFU by step "), sparkline(view.mfu.map((point) => [point.step, point.mfu]), { width: 300, height: 40, min: 0, cls: "mfu-sparkline" }));
    root.append(line);
  }
}

/** Loss by step; restarts and committed checkpoints as vertical marks on the same step axis. */
function drawLossChart(chart, view) {
  const width = 600, height = 260, left = 44, right = 10, top = 10, bottom = 24;
  const points = view.loss;
  if (points.length === 0) {
    chart.append(element("svg:text", { x: left, y: height / 2 }, "no loss reported yet"));
    return;
  }
  const marks = [...view.restarts.map((restart) => restart.resumeStep), ...view.checkpoints];
  const maxStep = Math.max(...points.map((point) => point.step), ...marks, 1);
  const losses = points.map((point) => point.loss);
  const low = Math.min(...losses), high = Math.max(...losses, low + 1e-9);
  const x = (step) => left + (step / maxStep) * (width - left - right);
  const y = (loss) => top + (1 - (loss - low) / (high - low)) * (height - top - bottom);
  chart.append(element("svg:line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#99a" }));
  chart.append(element("svg:line", { x1: left, y1: top, x2: left, y2: height - bottom, stroke: "#99a" }));
  chart.append(element("svg:text", { x: 2, y: top + 8 }, high.toPrecision(3)), element("svg:text", { x: 2, y: height - bottom }, low.toPrecision(3)));
  chart.append(element("svg:text", { x: left, y: height - 8 }, "0"), element("svg:text", { x: width - right - 30, y: height - 8 }, `step ${maxStep}`));
  for (const step of view.checkpoints) {
    chart.append(element("svg:line", { class: "checkpoint-marker", "data-step": step, x1: x(step), y1: top, x2: x(step), y2: height - bottom }));
  }
  for (const restart of view.restarts) {
    const at = x(restart.resumeStep);
    chart.append(element("svg:line", { class: "restart-marker", "data-step": restart.resumeStep, "data-attempt": restart.attempt, x1: at, y1: top, x2: at, y2: height - bottom }));
    const label = element("svg:text", { class: "restart-label", x: at + 3, y: top + 10 }, `restart ${restart.attempt}${restart.group ? ` (${restart.group})` : ""}`);
    label.append(element("svg:title", {}, restart.reason));
    chart.append(label);
  }
  // Outer steps: ticks along the step axis, each where the groups synced.
  for (const outer of view.outerSteps) {
    const tick = element("svg:line", { class: "outer-step-marker", "data-step": outer.step, "data-outer-step": outer.outerStep, x1: x(outer.step), y1: height - bottom - 6, x2: x(outer.step), y2: height - bottom });
    tick.append(element("svg:title", {}, `outer step ${outer.outerStep} at step ${outer.step}${outer.seconds === undefined ? "" : ` (${outer.seconds.toFixed(2)} s)`}`));
    chart.append(tick);
  }
  chart.append(element("svg:polyline", { class: "loss-line", points: points.map((point) => `${x(point.step).toFixed(1)},${y(point.loss).toFixed(1)}`).join(" ") }));
  for (const point of points) {
    const dot = element("svg:circle", { class: "loss-point", "data-step": point.step, "data-attempt": point.attempt, cx: x(point.step).toFixed(1), cy: y(point.loss).toFixed(1), r: 1.8 });
    dot.append(element("svg:title", {}, `step ${point.step} (attempt ${point.attempt}): loss ${point.loss}`));
    chart.append(dot);
  }
}

function renderLogs(view) {
  document.getElementById("logs-job").textContent = view.jobId ? `job ${view.jobId}, last ${view.lines.length} lines` : "";
  const pre = document.getElementById("logs");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.textContent = view.lines.join("\n");
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

const views = {
  cluster: () => getJson("/dashboard/api/cluster").then(renderCluster),
  job: () => getJson("/dashboard/api/job").then(renderJob),
  logs: () => getJson("/dashboard/api/logs").then(renderLogs),
};
/** Which views an event of each kind makes stale. */
const staleAfter = { job: ["job", "cluster", "logs"], metric: ["job"], log: ["logs"], workers: ["cluster"], telemetry: ["cluster"] };

// One fetch per view at a time; an event during a fetch asks for one more after it.
const inFlight = new Map();
const again = new Set();
function refresh(name) {
  if (inFlight.has(name)) {
    again.add(name);
    return;
  }
  const running = views[name]()
    .catch((error) => (document.getElementById("live").textContent = error.message))
    .finally(() => {
      inFlight.delete(name);
      if (again.delete(name)) refresh(name);
    });
  inFlight.set(name, running);
}

const events = new EventSource("/dashboard/events");
events.addEventListener("hello", () => {
  document.getElementById("live").textContent = "live";
  for (const name of Object.keys(views)) refresh(name);
});
for (const [kind, stale] of Object.entries(staleAfter)) events.addEventListener(kind, () => stale.forEach(refresh));
events.onerror = () => (document.getElementById("live").textContent = "disconnected; retrying…");
for (const name of Object.keys(views)) refresh(name);
