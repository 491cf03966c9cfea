// The live console's page: renders the state the server pushes (server-sent events on
// /api/stream) and posts the forms to the console, which relays them to the mutator.
// Plain DOM, no library; every id is shown with textContent (ids may hold any character).
"use strict";

(function () {
  let state = null;          // the last snapshot
  let clockOffset = 0;       // browser clock minus server clock (ms)
  const rendered = {};       // section -> signature of what it shows now

  // --- small helpers ------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "className") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function ago(epochMs) {
    const seconds = Math.max(0, (Date.now() - clockOffset - epochMs) / 1000);
    if (seconds < 10) return seconds.toFixed(1) + " s";
    if (seconds < 120) return Math.round(seconds) + " s";
    return Math.round(seconds / 60) + " min";
  }

  function since(epochMs, prefix = "", suffix = " ago") {
    return h("span", {
      className: "since", "data-since": epochMs, "data-prefix": prefix, "data-suffix": suffix,
    }, prefix + ago(epochMs) + suffix);
  }

  function updateAges() {
    for (const node of document.querySelectorAll("[data-since]")) {
      node.textContent = node.dataset.prefix + ago(Number(node.dataset.since)) + node.dataset.suffix;
    }
  }

  // Replace a section only when what it shows changed (ages tick on their own), so that
  // a button under the pointer is not swapped out between mouse-down and click.
  function renderSection(id, signature, build) {
    const json = JSON.stringify(signature);
    if (rendered[id] === json) return;
    rendered[id] = json;
    const target = document.getElementById(id);
    target.replaceChildren(...present([].concat(build())));
  }

  // What a list of children holds besides the gaps (null, undefined, false) that
  // conditional parts leave: DOM's append would write those out as text.
  function present(children) {
    return children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false);
  }

  function showPageError(message) {
    const node = document.getElementById("page-error");
    node.textContent = message;
    node.hidden = !message;
  }

  function readerLabel(reader) {
    return reader.kind === "cassandra" ? "Cassandra service" : reader.label;
  }

  function short(url) {
    return String(url || "").replace(/^https?:\/\//, "");
  }

  // --- the stream ---------------------------------------------------------------------

  function setStatus(kind, text) {
    const node = document.getElementById("status");
    node.className = "status " + kind;
    node.dataset.state = kind;
    node.textContent = text;
  }

  function connect() {
    const source = new EventSource("/api/stream");
    source.addEventListener("open", () => setStatus("live", "live"));
    source.addEventListener("state", (event) => {
      try {
        state = JSON.parse(event.data);
        clockOffset = Date.now() - state.now;
        setStatus("live", "live");
        render();
        showPageError("");
      } catch (error) {
        showPageError("Could not show the console's state: " + error);
      }
    });
    source.addEventListener("error", () => {
      setStatus("down", "console unreachable: reconnecting…");
    });
  }

  // --- rendering ----------------------------------------------------------------------

  function render() {
    renderKeys();
    renderWrites();
    renderTopology();
    renderEvents();
    updateAges();
  }

  function renderKeys() {
    const readers = state.readers;
    const signature = [readers, state.keys.map((k) => [k.locationId, k.sku, k.partition, k.owner,
      k.agree, Object.values(k.cells).map((c) => c && [c.count, c.found, c.error, c.changedAt,
        c.replica, c.behind, c.servedBy, c.waitingSeconds, c.firstSeen])])];
    renderSection("keys", signature, () => {
      if (!state.keys.length) {
        return h("p", { className: "empty" }, "No key watched yet: post a write, or watch a key.");
      }
      const head = h("tr", {},
        h("th", {}, "location / sku"), h("th", {}, "partition"),
        readers.map((r) => h("th", { className: r.kind, title: r.url }, readerLabel(r),
          h("div", { className: "hint" }, short(r.url)))),
        h("th", {}, ""));
      const rows = state.keys.map((key) => {
        const cells = readers.map((r) => keyCell(key.cells[r.url], r));
        return h("tr", {
          className: key.agree ? "key agree" : "key differ",
          "data-location": key.locationId, "data-sku": key.sku, "data-agree": String(key.agree),
        },
        h("td", { className: "key-name" }, h("strong", {}, key.locationId), " / ", key.sku),
        h("td", { className: "partition" }, String(key.partition),
          key.owner ? h("div", { className: "hint" }, key.owner) : null),
        cells,
        h("td", {}, h("button", {
          className: "small", type: "button", title: "stop watching",
          onclick: () => post("/api/unwatch", { locationId: key.locationId, sku: key.sku }),
        }, "×")));
      });
      return h("table", { className: "converge" }, h("thead", {}, head), h("tbody", {}, rows));
    });
  }

  function keyCell(cell, reader) {
    const attrs = { "data-reader": reader.url, "data-kind": reader.kind };
    if (!cell) return h("td", { ...attrs, className: "cell pending" }, "…");
    if (cell.error) {
      return h("td", { ...attrs, className: "cell error", "data-error": cell.error },
        h("div", { className: "error-text" }, cell.error),
        cell.lastCount !== null ? h("div", { className: "hint" }, "last seen " + cell.lastCount) : null);
    }
    const badges = [];
    if (cell.replica) badges.push(h("span", { className: "badge stale", title: cell.staleReason || "" }, cell.replica));
    if (cell.behind) badges.push(h("span", { className: "badge behind" }, "behind " + cell.behind));
    if (cell.waitingSeconds) badges.push(h("span", { className: "badge behind" }, "slow " + cell.waitingSeconds + " s"));
    return h("td", {
      ...attrs, className: "cell " + (cell.found ? "found" : "absent"),
      "data-count": cell.found ? cell.count : "none",
    },
    h("div", { className: "count" }, cell.found ? String(cell.count) : "—"),
    h("div", { className: "hint" },
      cell.changedAt ? since(cell.changedAt, cell.firstSeen ? "first seen " : "changed ") : null),
    cell.servedBy ? h("div", { className: "hint" }, "by " + cell.servedBy) : null,
    badges);
  }

  function renderWrites() {
    const readers = state.readers;
    renderSection("writes", [readers.map((r) => r.url), state.writes], () => {
      if (!state.writes.length) return h("p", { className: "empty" }, "Writes posted here appear here.");
      return h("ol", { className: "writes" }, state.writes.map((w) => writeRow(w, readers)));
    });
  }

  function writeRow(write, readers) {
    const sides = readers.filter((r) => write.sides[r.url]).map((r) => ({ reader: r, side: write.sides[r.url] }));
    const outcome = write.status === 200
      ? (write.decision ? write.decision : "200")
      : `${write.status} ${write.decision || write.error || ""}`;
    const max = Math.max(50, ...sides.map((s) => s.side.ms || 0));
    const width = 320;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", `0 0 ${width} 26`);
    svg.setAttribute("class", "timeline");
    const axis = document.createElementNS(svg.namespaceURI, "line");
    for (const [k, v] of Object.entries({ x1: 4, x2: width - 4, y1: 18, y2: 18 })) axis.setAttribute(k, v);
    svg.append(axis);
    for (const { reader, side } of sides) {
      if (side.ms === null || side.ms === undefined) continue;
      const x = 4 + (width - 8) * side.ms / max;
      const dot = document.createElementNS(svg.namespaceURI, "circle");
      dot.setAttribute("cx", x); dot.setAttribute("cy", 18); dot.setAttribute("r", 4);
      dot.setAttribute("class", reader.kind);
      const title = document.createElementNS(svg.namespaceURI, "title");
      title.textContent = `${readerLabel(reader)}: +${side.ms} ms`;
      dot.append(title);
      svg.append(dot);
    }
    const label = document.createElementNS(svg.namespaceURI, "text");
    label.setAttribute("x", width - 4); label.setAttribute("y", 9); label.setAttribute("text-anchor", "end");
    label.textContent = `${max.toFixed(0)} ms`;
    svg.append(label);
    const detail = sides.map(({ reader, side }) => h("span", {
      className: "side " + reader.kind + (side.error ? " error" : ""),
      "data-reader": reader.url, "data-ms": side.ms ?? "",
    }, readerLabel(reader) + ": ",
    side.ms !== null && side.ms !== undefined ? `+${side.ms} ms` : side.pending ? "waiting…" : (side.error || "—"),
    side.replica ? " (standby)" : ""));
    return h("li", { className: "write", "data-write": write.id, "data-status": write.status },
      h("div", {},
        h("span", { className: "kind" }, write.kind + (write.validate ? " (validated)" : "")), " ",
        h("strong", {}, write.locationId), " / ", write.sku, " count ", String(write.count), " → ",
        h("span", { className: write.status === 200 ? "ok" : "bad" }, outcome), " ",
        since(write.at), " ",
        h("button", {
          className: "small", type: "button",
          onclick: () => post("/api/watch", { locationId: write.locationId, sku: write.sku }),
        }, "watch")),
      write.status === 200 ? h("div", { className: "sides" }, svg, detail) : null);
  }

  function renderTopology() {
    const topology = state.topology;
    const control = state.control;
    renderSection("control-note", [control.allowed, control.reason, control.error, topology.error], () => [
      h("span", { className: control.allowed ? "ok" : "muted" },
        control.allowed ? "Stop / start allowed: " : "Stop / start not available: ", control.reason),
      control.error ? h("span", { className: "bad" }, " — " + control.error) : null,
      topology.error ? h("div", { className: "bad" }, topology.error) : null,
    ]);
    renderSection("instances", [topology.instances, control.allowed], () => instancesTable(topology, control));
    renderSection("partitions", [topology.partitions, topology.instances.map((i) => i.instanceId)],
      () => partitionsTable(topology));
    renderSection("backends", [topology.service, topology.mutator], () => backendsLine(topology));
  }

  function instancesTable(topology, control) {
    const rows = topology.instances.map((instance) => {
      const reachable = instance.reachable !== false;
      const service = instance.control;
      const buttons = [];
      if (control.allowed && service) {
        const busy = instance.busy;
        const running = service.state === "running";
        buttons.push(
          h("button", {
            type: "button", className: "danger", "data-action": "stop", "data-service": service.name,
            disabled: !running || !!busy,
            onclick: () => act(service.name, "stop", false),
            title: "SIGTERM: it finishes its batch and leaves the group; the others take its partitions at once",
          }, "Stop"),
          h("button", {
            type: "button", className: "danger", "data-action": "kill", "data-service": service.name,
            disabled: !running || !!busy,
            onclick: () => act(service.name, "stop", true),
            title: "kill -9: a crash; standbys answer until the group notices (session timeout)",
          }, "Kill -9"),
          h("button", {
            type: "button", "data-action": "start", "data-service": service.name,
            disabled: running || !!busy,
            onclick: () => act(service.name, "start", false),
          }, "Start"),
          h("span", { className: "hint" }, busy ? busy + "…" : `${service.name}: ${service.state}` +
            (service.pid ? ` (pid ${service.pid})` : "")));
      } else if (!control.allowed) {
        buttons.push(h("span", { className: "hint", title: control.reason }, "stop/start not allowed"));
      }
      const status = !reachable
        ? h("span", { className: "bad" }, instance.error || "unreachable")
        : instance.ready === false
          ? h("span", { className: "warn", title: instance.readyError || "" }, "not ready")
          : instance.ready ? h("span", { className: "ok" }, "ready") : h("span", { className: "muted" }, "…");
      const standby = (instance.standby || []).map((p) =>
        `${p}${instance.standbyLag && instance.standbyLag[p] !== undefined ? ` (lag ${instance.standbyLag[p]})` : ""}`);
      return h("tr", {
        className: reachable ? "instance" : "instance down",
        "data-instance": instance.instanceId || "", "data-url": instance.url,
        "data-partitions": (instance.partitions || []).join(","),
        "data-restoring": (instance.restoring || []).join(","),
        "data-reachable": String(reachable),
      },
      h("td", {}, h("strong", {}, instance.instanceId || "?"), h("div", { className: "hint" }, short(instance.url)),
        instance.selfReported ? null : h("div", { className: "hint" }, "as others list it")),
      h("td", { className: reachable ? "" : "error" }, status),
      h("td", {}, (instance.partitions || []).join(", ") || "—"),
      h("td", {}, (instance.restoring || []).join(", ") || "—"),
      h("td", {}, standby.join(", ") || "—"),
      h("td", { className: "num" }, instance.ratePerSecond === null || instance.ratePerSecond === undefined ? "—" : String(instance.ratePerSecond)),
      h("td", { className: "controls" }, buttons));
    });
    return h("table", { className: "instances" },
      h("thead", {}, h("tr", {}, h("th", {}, "instance"), h("th", {}, "state"), h("th", {}, "active"),
        h("th", {}, "restoring"), h("th", {}, "standby (lag)"), h("th", {}, "records/s"), h("th", {}, ""))),
      h("tbody", {}, rows));
  }

  function partitionsTable(topology) {
    const ids = topology.instances.map((i) => i.instanceId).filter(Boolean);
    const rows = topology.partitions.map((p) => h("tr", {
      "data-partition": p.partition, "data-owner": p.owner || "", "data-state": p.state,
    },
    h("td", { className: "num" }, String(p.partition)),
    ids.map((id) => {
      const standby = (p.standbys || []).find((s) => s.instanceId === id);
      if (p.owner === id) return h("td", { className: "role " + p.state }, p.state);
      if (standby) return h("td", { className: "role standby" }, `standby (lag ${standby.lag})`);
      return h("td", { className: "role none" }, "");
    }),
    h("td", { className: p.owner ? "" : "role unowned" }, p.owner ? "" : "unowned"),
    h("td", { className: "num" }, p.lag === null || p.lag === undefined ? "—" : String(p.lag)),
    h("td", { className: "num" }, p.serviceLag === null || p.serviceLag === undefined ? "—" : String(p.serviceLag))));
    return h("table", { className: "partitions" },
      h("thead", {}, h("tr", {}, h("th", {}, "partition"), ids.map((id) => h("th", {}, id)), h("th", {}, ""),
        h("th", { title: "input records the owner has not applied yet" }, "input lag"),
        h("th", { title: "sellable_inventory records the Cassandra writer has not written yet" }, "Cassandra writer lag"))),
      h("tbody", {}, rows));
  }

  function backendsLine(topology) {
    const one = (name, b) => h("span", { className: "backend", "data-backend": name },
      h("strong", {}, name), " ", short(b.url), ": ",
      b.reachable === false ? h("span", { className: "bad" }, b.error || "unreachable")
        : b.ready === false ? h("span", { className: "warn", title: b.readyError || "" }, "not ready")
          : b.ready ? h("span", { className: "ok" }, "ready") : "…",
      b.ratePerSecond !== null && b.ratePerSecond !== undefined
        ? h("span", { className: "hint" }, ` ${b.ratePerSecond}/s`) : null);
    return h("p", {}, one("Cassandra service", topology.service), " · ", one("mutator", topology.mutator));
  }

  function renderEvents() {
    renderSection("events", state.events, () => state.events.length
      ? state.events.map((e) => h("li", { className: e.tone }, since(e.at), " — ", e.text))
      : h("li", { className: "empty" }, "Nothing yet: partitions moving, instances stopping and coming back show here."));
  }

  // --- actions ------------------------------------------------------------------------

  async function post(url, body) {
    try {
      const response = await fetch(url, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const answer = await response.json().catch(() => ({ message: "answer is not JSON" }));
      if (!response.ok) showPageError(`${url}: ${response.status} ${answer.message || ""}`);
      return { response, answer };
    } catch (error) {
      showPageError(`${url}: the console does not answer (${error})`);
      return null;
    }
  }

  async function act(name, action, kill) {
    const what = action === "start" ? `Start ${name} again?`
      : kill ? `kill -9 ${name}? (a crash: the standbys answer until the group notices)`
        : `Stop ${name}? (SIGTERM: it hands its partitions over; it stays down until you start it)`;
    if (!window.confirm(what)) return;
    const query = action === "stop" && kill ? "?signal=KILL" : "";
    await post(`/api/control/${encodeURIComponent(name)}/${action}${query}`, {});
  }

  function clearErrors(form) {
    for (const node of form.querySelectorAll(".field-error")) node.textContent = "";
    for (const node of form.querySelectorAll("input.invalid")) node.classList.remove("invalid");
  }

  function fieldError(form, prefix, field, problem) {
    const id = { locationId: "location", location: "location", sku: "sku", count: "count" }[field];
    const input = id ? document.getElementById(`${prefix}-${id}`) : null;
    const slot = input ? form.querySelector(`.field-error[data-for="${prefix}-${id}"]`) : null;
    if (input && slot) {
      input.classList.add("invalid");
      slot.textContent = `${field}: ${problem}`;
      return true;
    }
    return false;
  }

  function countValue(text) {
    const trimmed = text.trim();
    return /^-?\d+$/.test(trimmed) ? Number(trimmed) : trimmed;
  }

  async function submitMutation(event) {
    event.preventDefault();
    const form = event.target;
    const kind = form.dataset.kind;
    const prefix = kind === "adjustment" ? "adj" : "res";
    const answerBox = document.getElementById(`${prefix}-answer`);
    clearErrors(form);
    const body = {
      locationId: document.getElementById(`${prefix}-location`).value,
      sku: document.getElementById(`${prefix}-sku`).value,
      count: countValue(document.getElementById(`${prefix}-count`).value),
    };
    const validate = kind === "reservation" && document.getElementById("res-validate").checked;
    answerBox.className = "answer pending";
    answerBox.textContent = "sending…";
    const button = form.querySelector("button");
    button.disabled = true;
    let result;
    try {
      result = await post(`/api/${kind}${validate ? "?validate=true" : ""}`, body);
    } finally {
      button.disabled = false;
    }
    if (!result) {
      answerBox.className = "answer bad";
      answerBox.textContent = "the console does not answer";
      return;
    }
    showPageError("");
    const { response, answer } = result;
    answerBox.dataset.status = response.status;
    answerBox.replaceChildren();
    const line = (label, value) => value === undefined || value === null ? null
      : h("div", {}, h("span", { className: "muted" }, label + " "), h("code", {}, String(value)));
    const good = response.status === 200;
    answerBox.className = "answer " + (good ? "ok" : response.status === 202 ? "warn" : "bad");
    answerBox.append(...present([
      h("div", { className: "status-line" }, h("strong", { "data-field": "status" }, String(response.status)), " ",
        answer.status ? h("strong", { "data-field": "decision" }, answer.status) : null, " ",
        answer.error ? h("span", { "data-field": "error" }, answer.error) : null),
      line("position", answer.position),
      line("mutationId", answer.mutationId),
      answer.available !== undefined ? line("available", answer.available) : null,
      answer.reason ? line("reason", answer.reason) : null,
      !good && answer.message ? h("div", { className: "message", "data-field": "message" }, answer.message) : null]));
    for (const detail of answer.details || []) {
      if (!fieldError(form, prefix, detail.field, detail.problem)) {
        answerBox.append(h("div", { className: "bad" }, `${detail.field}: ${detail.problem}`));
      }
    }
  }

  async function submitWatch(event) {
    event.preventDefault();
    const slot = document.querySelector('.field-error[data-for="watch"]');
    slot.textContent = "";
    const result = await post("/api/watch", {
      locationId: document.getElementById("watch-location").value,
      sku: document.getElementById("watch-sku").value,
    });
    if (result && !result.response.ok) {
      showPageError("");
      slot.textContent = (result.answer.details || []).map((d) => `${d.field}: ${d.problem}`).join("; ")
        || result.answer.message || String(result.response.status);
    }
  }

  async function loadCompare() {
    const target = document.getElementById("compare-runs");
    try {
      const response = await fetch("/api/compare");
      const body = await response.json();
      if (!body.runs.length) {
        target.replaceChildren(h("p", { className: "empty" },
          `No report yet in ${body.directory}: run `, h("code", {}, "make compare"), "."));
        return;
      }
      const latest = body.runs[0];
      target.replaceChildren(
        h("p", {}, "Latest: ", h("a", { href: latest.url, target: "_blank" }, latest.name),
          body.runs.length > 1 ? ` (and ${body.runs.length - 1} older)` : ""),
        h("details", {}, h("summary", {}, "show it here"),
          h("iframe", { src: latest.url, className: "report", title: "make compare report", loading: "lazy" })));
    } catch (error) {
      target.replaceChildren(h("p", { className: "bad" }, "Could not list the reports: " + error));
    }
  }

  document.getElementById("adj-form").addEventListener("submit", submitMutation);
  document.getElementById("res-form").addEventListener("submit", submitMutation);
  document.getElementById("watch-form").addEventListener("submit", submitWatch);
  window.addEventListener("error", (event) => showPageError("Page error: " + event.message));
  setInterval(updateAges, 250);
  loadCompare();
  connect();
})();
