// The gpufleet dashboard: polls /ui/api/fleet and renders it. Plain DOM, no framework: every
// value from the cluster goes in as text (textContent), never as HTML.

const POLL_MS = 1500;
const TOKEN_KEY = "gpufleet-status-token";
const ADMIN_KEY = "gpufleet-admin-token"; // opens status too; sent instead of the status token when set
const STATES = ["READY", "STARTING", "DEGRADED", "DOWN", "DRAINED"];

let last = null; // the last view received: shown, marked stale, when the coordinator cannot be reached

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("data-") || k === "title" || k === "style") el.setAttribute(k, v);
    else el[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const fmt = {
  time: (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–"),
  num: (v, unit = "", digits = 0) => (v === null || v === undefined ? "–" : `${v.toFixed(digits)}${unit}`),
  age: (s) => (s === null || s === undefined ? "" : s < 60 ? `${Math.round(s)} s ago` : `${Math.round(s / 60)} min ago`),
};

function badge(state, extra = "") {
  return h("span", { class: `badge s-${(state || "none").toLowerCase()} ${extra}` }, state || "–");
}

function bar(percent, label, level = "") {
  const p = Math.max(0, Math.min(100, percent ?? 0));
  return h(
    "div",
    { class: `bar ${level}`, title: label },
    h("div", { class: "fill", style: `width:${p}%` }),
    h("span", {}, label),
  );
}

function authHeaders() {
  const token = sessionStorage.getItem(ADMIN_KEY) || sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

const isAdmin = () => Boolean(sessionStorage.getItem(ADMIN_KEY));

function adminControls(v) {
  if (!v.admin.available) return [];
  if (isAdmin()) {
    return [h("button", { class: "pill link", id: "admin-signout", onclick: signOut, title: "forget the admin token in this tab" }, "admin: sign out")];
  }
  return [h("button", { class: "pill link", id: "admin-signin", onclick: () => (document.getElementById("admin-form").hidden = false) }, "admin: sign in to drain")];
}

function signOut() {
  sessionStorage.removeItem(ADMIN_KEY);
  poll();
}

async function changeDrain(node, method, reason) {
  const r = await fetch(`/ui/api/drain/${encodeURIComponent(node)}`, {
    method,
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: method === "PUT" ? JSON.stringify({ reason }) : undefined,
  });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    showNotice(`${method === "PUT" ? "drain" : "undrain"} ${node} failed: ${body.error?.message || `HTTP ${r.status}`}`);
    return;
  }
  poll();
}

function drainButton(n) {
  if (!isAdmin() || !last?.admin.available) return null;
  if (n.drain) return h("button", { class: "act undrain", onclick: () => changeDrain(n.node, "DELETE") }, "Undrain");
  return h("button", { class: "act drain", onclick: () => openDrainDialog(n.node) }, "Drain…");
}

function openDrainDialog(node) {
  document.getElementById("drain-node").textContent = node;
  document.getElementById("drain-reason").value = "";
  const dialog = document.getElementById("drain-dialog");
  dialog.dataset.drainNode = node;
  dialog.returnValue = ""; // Esc keeps the last value: only a click on Drain drains
  dialog.showModal();
}

function renderHeader(v) {
  document.getElementById("cluster").textContent = `· ${v.cluster}`;
  const role = v.replica.is_leader ? "leader" : "standby";
  const leader = v.leader.id ? `${v.leader.id}, epoch ${v.leader.epoch}` : "none known";
  const deg = v.degradation ? v.degradation.level : 0;
  const counts = STATES.filter((s) => v.summary[s]).map((s) => h("span", { class: `count s-${s.toLowerCase()}` }, `${v.summary[s]} ${s}`));
  document.getElementById("badges").replaceChildren(
    h("span", { class: "pill", "data-leader": v.leader.id || "" }, "leader ", h("b", {}, leader)),
    h("span", { class: "pill" }, "this replica ", h("b", {}, `${v.replica.id} (${role})`)),
    h(
      "span",
      { class: `pill deg-${deg}`, "data-degradation": String(deg), title: v.degradation ? `error rate ${(v.degradation.error_rate * 100).toFixed(1)} % over ${v.degradation.samples} attempts` : "no degradation record" },
      "degradation ",
      h("b", {}, `level ${deg}`),
    ),
    ...counts,
    ...adminControls(v),
  );
}

function renderGpu(g, temp) {
  const t = g.temperature_c;
  const mem = g.memory_total_gib ? (100 * (g.memory_used_gib ?? 0)) / g.memory_total_gib : 0;
  return h(
    "tr",
    { "data-gpu": String(g.index), class: g.lost ? "lost" : "" },
    h("td", {}, `GPU ${g.index}`),
    h("td", { class: "gpu-name", title: g.name }, g.gpu_class),
    h("td", { class: `temp t-${g.temperature_level}`, "data-temp": t ?? "", title: `highlighted from ${temp.warn_c} °C; over ${temp.limit_c} °C the node is judged too hot` }, fmt.num(t, " °C")),
    h("td", {}, bar(g.utilization_percent, `util ${fmt.num(g.utilization_percent, " %")}`)),
    h("td", {}, bar(mem, `${fmt.num(g.memory_used_gib, "", 1)} / ${fmt.num(g.memory_total_gib, " GiB")}`)),
    g.lost ? h("td", { class: "t-bad" }, "lost") : g.errors.length ? h("td", { class: "t-warn", title: g.errors.join(", ") }, "read errors") : null,
  );
}

function renderInstance(i) {
  return h(
    "tr",
    { "data-instance": i.name, "data-weight": i.weight ?? "" },
    h("td", {}, i.name),
    h("td", {}, i.model),
    h("td", {}, i.state ? badge(i.state) : "–", i.restarts ? h("small", { title: i.last_error || "" }, ` ↻${i.restarts}`) : null),
    h("td", {}, i.route_state ? badge(i.route_state) : h("small", {}, "not routed")),
    h("td", { class: "num" }, i.weight ?? "–", i.share_percent !== null && i.share_percent !== undefined ? h("small", {}, ` (${i.share_percent} %)`) : null),
  );
}

function renderNode(n, temp, generatedAt) {
  const age = n.updated_at ? generatedAt - n.updated_at : null;
  return h(
    "article",
    { class: `node s-${n.state.toLowerCase()} ${n.live ? "" : "gone"}`, "data-node": n.node, "data-state": n.state },
    h("div", { class: "node-head" }, h("b", {}, n.node), h("span", {}, drainButton(n), badge(n.state, "node-state"))),
    h("div", { class: "node-meta" }, n.address || "no record", n.live ? ` · record updated ${fmt.age(age)}` : n.updated_at ? ` · last seen ${fmt.time(n.updated_at)}` : ""),
    n.drain ? h("div", { class: "drain" }, `drained by ${n.drain.by || "?"} at ${fmt.time(n.drain.at)}${n.drain.reason ? `: ${n.drain.reason}` : ""}`) : null,
    n.gpus.length ? h("table", { class: "gpus" }, h("tbody", {}, n.gpus.map((g) => renderGpu(g, temp)))) : null,
    n.instances.length
      ? h("table", { class: "instances" }, h("thead", {}, h("tr", {}, ["instance", "model", "state", "route", "weight"].map((c) => h("th", {}, c)))), h("tbody", {}, n.instances.map(renderInstance)))
      : h("div", { class: "node-meta" }, "no instances"),
  );
}

function renderClasses(v) {
  document.getElementById("classes").replaceChildren(
    ...v.classes.map((c) =>
      h("div", { class: "class", "data-class": c.gpu_class }, h("h3", {}, c.gpu_class, h("small", {}, ` ${c.nodes.length} node${c.nodes.length === 1 ? "" : "s"}`)), h("div", { class: "nodes" }, c.nodes.map((n) => renderNode(n, v.temperature, v.generated_at)))),
    ),
  );
  if (!v.classes.length) document.getElementById("classes").append(h("p", { class: "empty" }, "No nodes registered."));
}

function renderRoutes(v) {
  const out = v.routes.map((r) =>
    h(
      "div",
      { class: "route", "data-route": r.model },
      h("h3", {}, r.model, h("small", {}, ` epoch ${r.epoch}${r.cross_class ? " · cross-class" : ""}${r.panic_classes.length ? ` · panic: ${r.panic_classes.join(", ")}` : ""}${r.incomplete ? " · being rewritten" : ""}`)),
      h(
        "table",
        {},
        h(
          "tbody",
          {},
          r.endpoints.map((e) =>
            h(
              "tr",
              { "data-endpoint": `${e.node}/${e.instance}`, "data-weight": String(e.weight), "data-state": e.state },
              h("td", {}, e.node, h("small", {}, ` ${e.instance}`)),
              h("td", {}, e.gpu_class),
              h("td", {}, badge(e.state)),
              h("td", { class: "share" }, bar(e.share_percent, `${e.weight} · ${e.share_percent} %`, e.weight ? "" : "zero")),
            ),
          ),
        ),
      ),
    ),
  );
  document.getElementById("routes").replaceChildren(...(out.length ? out : [h("p", { class: "empty" }, "No routes yet.")]));
}

function renderPlacement(v) {
  const el = document.getElementById("placement");
  if (!v.placement || !v.placement.models.length) {
    el.replaceChildren(h("p", { class: "empty" }, "No registered models (gpuctl models add)."));
    return;
  }
  el.replaceChildren(
    h(
      "table",
      { class: "placement" },
      h("thead", {}, h("tr", {}, ["model", "replicas", "on", "unplaced"].map((c) => h("th", {}, c)))),
      h(
        "tbody",
        {},
        v.placement.models.map((m) =>
          h(
            "tr",
            { "data-placement": m.model, class: m.unplaced ? "unplaced" : "" },
            h("td", {}, m.model),
            h("td", { class: "num" }, `${m.nodes.length}/${m.desired}`),
            h("td", {}, m.nodes.join(", ") || "–"),
            h("td", {}, m.unplaced ? h("span", { class: "t-bad" }, `${m.unplaced}: `) : "–", m.reasons.join("; ")),
          ),
        ),
      ),
    ),
  );
}

function renderEvents(v) {
  document.getElementById("events-note").textContent = `(seen by ${v.replica.id} since it started)`;
  document.getElementById("events").replaceChildren(
    ...v.events.map((e) => h("li", { class: `ev-${e.severity}`, "data-kind": e.kind }, h("time", {}, fmt.time(e.at)), " ", e.text)),
  );
}

function showNotice(text) {
  const el = document.getElementById("notice");
  el.hidden = !text;
  el.textContent = text || "";
}

function render(v, problem) {
  renderHeader(v);
  renderClasses(v);
  renderRoutes(v);
  renderPlacement(v);
  renderEvents(v);
  let notice = problem;
  if (!notice && !v.etcd.reachable) notice = `etcd unreachable from ${v.replica.id} (${v.etcd.error}): the data shown is as of ${v.etcd.ok_at ? fmt.time(v.etcd.ok_at) : "the last change seen"}`;
  if (!notice && !v.synced) notice = `${v.replica.id} is still reading the fleet from etcd`;
  showNotice(notice);
  document.body.classList.toggle("stale", Boolean(notice));
  document.getElementById("footer").textContent = `updated ${fmt.time(v.generated_at)} by ${v.replica.id}`;
}

async function poll() {
  try {
    const r = await fetch("/ui/api/fleet", { headers: authHeaders(), cache: "no-store" });
    if (r.status === 401) {
      if (isAdmin()) {
        sessionStorage.removeItem(ADMIN_KEY); // a rotated admin token: back to the status token
        return poll();
      }
      document.getElementById("token-form").hidden = false;
      showNotice(sessionStorage.getItem(TOKEN_KEY) ? "That token was refused." : "");
      return;
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    document.getElementById("token-form").hidden = true;
    last = await r.json();
    render(last, null);
    document.body.dataset.loaded = "true";
  } catch (err) {
    const text = `coordinator unreachable (${err.message}); showing what it last sent`;
    if (last) render(last, text);
    else showNotice(text);
  }
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
  poll();
});

document.getElementById("admin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const token = document.getElementById("admin-token").value.trim();
  const r = await fetch("/ui/api/admin", { headers: { Authorization: `Bearer ${token}` } });
  if (!r.ok) {
    showNotice("That admin token was refused.");
    return;
  }
  sessionStorage.setItem(ADMIN_KEY, token);
  document.getElementById("admin-token").value = "";
  document.getElementById("admin-form").hidden = true;
  poll();
});

document.getElementById("admin-cancel").addEventListener("click", () => (document.getElementById("admin-form").hidden = true));

document.getElementById("drain-dialog").addEventListener("close", (ev) => {
  const dialog = ev.target;
  if (dialog.returnValue === "drain") changeDrain(dialog.dataset.drainNode, "PUT", document.getElementById("drain-reason").value.trim());
});

async function loop() {
  await poll();
  setTimeout(loop, POLL_MS);
}
loop();
