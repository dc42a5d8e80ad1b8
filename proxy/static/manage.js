/* The organizer page: events, codes shown once, live usage with charts and CSV, attendees.
   Uses the organizer API only. The key lives in this tab's sessionStorage and travels only in the
   Authorization header; signed in with Entra ID (App Service authentication), the platform's cookie does. */
"use strict";
(function () {
  const { API, call, el, $, copy, showAlert, clearAlert, number, usd, localTime, session } = window.Portal;
  const KEY = "eventproxy.organizer";
  const LIVE_MS = 5000;
  const NUMBERS = {
    "f-max-tokens": "max_tokens", "f-daily-requests": "daily_requests", "f-daily-tokens": "daily_tokens", "f-tpm": "tpm",
    "f-event-requests": "event_requests", "f-event-tokens": "event_tokens", "f-max-attendees": "max_attendees",
    "f-session-turns": "session_turns", "f-session-chars": "session_chars",
    "f-daily-cost": "daily_cost", "f-event-cost": "event_cost",
  };
  const EVENT_WIDE = ["event_requests", "event_tokens", "max_attendees", "event_cost"];
  let key = session.get(KEY);
  let entra = false; // signed in through App Service authentication instead of a key
  let events = [];
  let defaults = {};
  let selected = null; // the event shown in detail
  let me = null; // who is signed in: {name, role} (proxy.policy.accounts)
  let editing = null; // the event being edited, null when creating
  let grouping = "user";
  let liveTimer = null;
  const ACTIVITY_EVERY = 6; // live ticks between two readings of the charts (30 s)
  let lastRows = []; // the usage rows charted, drawn again when the window's width changes

  function headers(extra) {
    // The marker header is what a cross-site form or link cannot send: the API trusts a signed-in
    // Entra ID session only with it (proxy.config.principal).
    const h = Object.assign({ "x-organizer-portal": "1" }, extra || {});
    if (key) h.authorization = "Bearer " + key;
    return h;
  }

  function manage(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    return call("/manage" + path, opts);
  }

  function stateOf(event) {
    const now = Date.now();
    if (!event.active) return ["disabled", "Disabled"];
    if (now < Date.parse(event.start)) return ["upcoming", "Upcoming"];
    if (now >= Date.parse(event.end)) return ["ended", "Ended"];
    return ["open", "Open"];
  }

  function badge(event) {
    const [cls, label] = stateOf(event);
    return el("span", { className: "badge " + cls }, label);
  }

  // Sign-in

  async function signIn(given) {
    clearAlert();
    key = given;
    const answer = await manage("/events");
    if (!answer.ok) {
      key = null;
      session.remove(KEY);
      // Without a key, a 401 only means "not signed in with Entra ID" unless it says more.
      if (given !== null || answer.status !== 401 || /Entra ID/.test(answer.message || "")) showAlert(answer.message);
      return false;
    }
    if (given !== null) session.set(KEY, given); else entra = true;
    $("sign-in").hidden = true;
    $("console").hidden = false;
    $("sign-out").hidden = false;
    showEvents(answer.data.data, answer.data.account);
    refreshAudit();
    const schema = await manage("/openapi.json");
    if (schema.ok) readDefaults(schema.data);
    return true;
  }

  function signOut() {
    session.remove(KEY);
    key = null;
    clearInterval(liveTimer);
    if (entra) {
      location.assign("/.auth/logout?post_logout_redirect_uri=" + encodeURIComponent(location.pathname));
      return;
    }
    location.reload();
  }

  function readDefaults(schema) {
    const schemas = (schema.components && schema.components.schemas) || {};
    const create = schemas.EventCreate;
    if (!create || !create.properties) return;
    for (const [name, spec] of Object.entries(create.properties)) {
      if (spec && spec.default !== undefined && spec.default !== null) defaults[name] = spec.default;
    }
  }

  // Events

  async function loadEvents() {
    const answer = await manage("/events");
    if (!answer.ok) { showAlert(answer.message); return; }
    showEvents(answer.data.data, answer.data.account);
    refreshAudit();
  }

  // What the signed-in account may change (the API decides; the page only hides what would be refused).
  function mayChange(event) {
    if (!me || me.role === "admin") return true;
    if (me.role === "viewer") return false;
    return event.owner === me.name || (event.shared || {})[me.name] === "organizer";
  }

  function showEvents(list, account) {
    if (account) me = account;
    $("new-event").hidden = Boolean(me && me.role === "viewer");
    events = list.slice().sort((a, b) => Date.parse(b.start) - Date.parse(a.start));
    $("no-events").hidden = events.length > 0;
    $("events").querySelector("tbody").replaceChildren(...events.map((event) => el("tr", { "data-id": event.id },
      el("td", {}, el("strong", {}, event.name), el("br"), el("small", { className: "hint" }, event.id)),
      el("td", {}, badge(event)),
      el("td", {}, localTime(event.start, event.time_zone), el("br"), "to " + localTime(event.end, event.time_zone)),
      el("td", { "data-label": "Models" }, event.models.join(", ")),
      el("td", {}, el("button", { type: "button", className: "quiet", "aria-label": "Manage " + event.name,
        onclick: () => select(event.id) }, "Manage")))));
    if (selected) {
      const fresh = events.find((e) => e.id === selected.id);
      if (fresh) showDetail(fresh);
    }
  }

  function select(id) {
    const event = events.find((e) => e.id === id);
    if (!event) return;
    $("editor").hidden = true;
    showDetail(event);
    $("usage").hidden = false;
    $("activity").hidden = false;
    $("plan").hidden = false;
    $("plan-result").replaceChildren();
    $("plan-attendees").value = event.max_attendees || "";
    refreshUsage();
    refreshAttendees();
    refreshActivity();
    refreshAudit();
    clearInterval(liveTimer);
    let ticks = 0;
    liveTimer = setInterval(() => {
      if (!$("live").checked) return;
      refreshUsage(); refreshAttendees();
      if (++ticks % ACTIVITY_EVERY === 0) { refreshActivity(); refreshAudit(); }  // not every 5 s
    }, LIVE_MS);
    $("detail").scrollIntoView({ block: "start" });
  }

  function fact(term, value) { return el("div", {}, el("dt", {}, term), el("dd", {}, value)); }

  function cap(value, unit) { return value === null || value === undefined ? "no cap" : number(value) + (unit || ""); }

  function showDetail(event) {
    selected = event;
    $("detail").hidden = false;
    $("detail-name").textContent = event.name;
    $("detail-state").replaceWith(Object.assign(badge(event), { id: "detail-state" }));
    $("detail-description").textContent = event.description || "";
    const facts = [
      fact("Opens", localTime(event.start, event.time_zone)),
      fact("Closes", localTime(event.end, event.time_zone)),
      fact("Time zone", event.time_zone),
      fact("Models", event.models.join(", ")),
      fact("Max tokens per request", number(event.max_tokens)),
      fact("Requests per attendee per day", cap(event.daily_requests)),
      fact("Tokens per attendee per day", cap(event.daily_tokens)),
      fact("Tokens per minute", cap(event.tpm)),
    ];
    if ("event_requests" in event) {
      facts.push(fact("Requests, whole event", cap(event.event_requests)),
        fact("Tokens, whole event", cap(event.event_tokens)), fact("Attendees at most", cap(event.max_attendees)));
    }
    const money = (value) => (value === null || value === undefined ? "no cap" : usd(value));
    if (event.daily_cost != null) facts.push(fact("Cost per attendee per day", money(event.daily_cost)));
    if (event.event_cost != null) facts.push(fact("Cost, whole event", money(event.event_cost)));
    if (event.alert_webhook) facts.push(fact("Budget alerts to", event.alert_webhook));
    if (event.attendee_keys) facts.push(fact("Credentials", "personal keys only"));
    if (event.organizer) facts.push(fact("Organizer", event.organizer));
    if (event.owner) facts.push(fact("Owner", event.owner));
    const shares = Object.entries(event.shared || {});
    if (shares.length) facts.push(fact("Shared with", shares.map(([who, role]) => who + " (" + role + ")").join(", ")));
    facts.push(fact("Id", event.id));
    $("detail-facts").replaceChildren(...facts);
    $("toggle-active").textContent = event.active ? "Disable" : "Enable";
    for (const id of ["edit-event", "rotate-code", "toggle-active", "delete-event"]) $(id).hidden = !mayChange(event);
  }

  // Editor

  function zoneOffset(utcMs, zone) {
    const parts = new Intl.DateTimeFormat("en-US", {
      timeZone: zone, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit",
    }).formatToParts(new Date(utcMs));
    const get = (type) => Number(parts.find((p) => p.type === type).value);
    return Date.UTC(get("year"), get("month") - 1, get("day"), get("hour"), get("minute"), get("second")) - utcMs;
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  /** "2026-11-21T09:00" read in `zone` -> "2026-11-21T09:00:00+01:00" */
  function wallToIso(wall, zone) {
    const [date, time] = wall.split("T");
    const [y, m, d] = date.split("-").map(Number);
    const [h, mi] = time.split(":").map(Number);
    const guess = Date.UTC(y, m - 1, d, h, mi);
    let utc = guess - zoneOffset(guess, zone);
    utc = guess - zoneOffset(utc, zone); // once more, across a daylight-saving change
    const offset = zoneOffset(utc, zone) / 60000;
    const sign = offset < 0 ? "-" : "+";
    const abs = Math.abs(offset);
    return new Date(utc + offset * 60000).toISOString().slice(0, 19) + sign + pad(Math.floor(abs / 60)) + ":" + pad(abs % 60);
  }

  function isoToWall(iso, zone) {
    const utc = Date.parse(iso);
    return new Date(utc + zoneOffset(utc, zone)).toISOString().slice(0, 16);
  }

  function knownModels() {
    const names = new Set(defaults.models || []);
    for (const event of events) event.models.forEach((m) => names.add(m));
    return [...names].sort();
  }

  function openEditor(event) {
    editing = event;
    const zone = event ? event.time_zone : (Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC");
    $("editor-title").textContent = event ? "Edit " + event.name : "New event";
    $("editor-save").textContent = event ? "Save changes" : "Create event";
    $("f-code-box").hidden = !!event;
    $("f-name").value = event ? event.name : "";
    $("f-organizer").value = event ? event.organizer || "" : "";
    $("f-description").value = event ? event.description || "" : "";
    $("f-code").value = "";
    $("f-zone").value = zone;
    const start = event ? event.start : new Date(Math.floor(Date.now() / 60000) * 60000).toISOString();
    const end = event ? event.end : new Date(Date.parse(start) + 8 * 3600000).toISOString();
    $("f-start").value = isoToWall(start, zone);
    $("f-end").value = isoToWall(end, zone);
    const chosen = new Set(event ? event.models : defaults.models || []);
    const known = knownModels();
    $("f-models-known").replaceChildren(...known.map((m) => el("label", { className: "inline" },
      el("input", { type: "checkbox", value: m, checked: chosen.has(m), name: "model" }), m)));
    $("f-models-other").value = event ? event.models.filter((m) => !known.includes(m)).join(", ") : "";
    for (const [id, field] of Object.entries(NUMBERS)) {
      const value = event ? event[field] : defaults[field];
      $(id).value = value === null || value === undefined ? "" : String(value);
    }
    // The event-wide fields only where the API has them (an event without them: an older proxy).
    $("f-event-wide").hidden = event ? !("event_requests" in event) : events.some((e) => !("event_requests" in e));
    // Shown masked (its path is a secret): left as it is, it is not sent; emptied, it is removed.
    $("f-alert-webhook").value = event && event.alert_webhook ? event.alert_webhook : "";
    $("f-active").checked = event ? event.active : true;
    $("f-attendee-keys").checked = event ? !!event.attendee_keys : false;
    $("editor").hidden = false;
    $("f-name").focus();
  }

  function formFields() {
    const zone = $("f-zone").value.trim();
    const models = [...$("f-models-known").querySelectorAll("input:checked")].map((i) => i.value)
      .concat($("f-models-other").value.split(",").map((m) => m.trim()).filter(Boolean));
    const fields = {
      name: $("f-name").value.trim(), description: $("f-description").value.trim(), organizer: $("f-organizer").value.trim(),
      time_zone: zone, start: wallToIso($("f-start").value, zone), end: wallToIso($("f-end").value, zone),
      active: $("f-active").checked,
    };
    if (editing === null || "attendee_keys" in editing) fields.attendee_keys = $("f-attendee-keys").checked;
    if (models.length) fields.models = models;
    if (!$("f-event-wide").hidden) fields.alert_webhook = $("f-alert-webhook").value.trim() || null;
    for (const [id, field] of Object.entries(NUMBERS)) {
      if (EVENT_WIDE.includes(field) && $("f-event-wide").hidden) continue;
      const raw = $(id).value.trim();
      fields[field] = raw === "" ? null : Number(raw);
    }
    return fields;
  }

  async function save(submit) {
    submit.preventDefault();
    clearAlert();
    let fields;
    try {
      fields = formFields();
    } catch (_) {
      showAlert("Check the time zone: it must be an IANA name such as Europe/Paris or UTC.");
      return;
    }
    let answer;
    if (editing) {
      const changes = {};
      for (const [name, value] of Object.entries(fields)) {
        const before = editing[name];
        // The form shows minutes: a time whose minute did not change keeps its seconds.
        const minute = (iso) => Math.floor(Date.parse(iso) / 60000);
        const same = name === "start" || name === "end" ? minute(before) === minute(value)
          : JSON.stringify(before === undefined ? null : before) === JSON.stringify(value);
        if (!same) changes[name] = value;
      }
      if (changes.max_tokens === null) delete changes.max_tokens; // required: blank keeps it
      if (!Object.keys(changes).length) { $("editor").hidden = true; return; }
      answer = await manage("/events/" + encodeURIComponent(editing.id), { method: "PATCH", json: changes });
    } else {
      const code = $("f-code").value.trim();
      if (code) fields.code = code;
      for (const [name, value] of Object.entries(fields)) if (value === null || value === "") delete fields[name];
      for (const name of ["daily_requests"]) if (!(name in fields)) fields[name] = null; // blank: no cap
      answer = await manage("/events", { method: "POST", json: fields });
    }
    if (!answer.ok) { showAlert(answer.message); return; }
    $("editor").hidden = true;
    await loadEvents();
    if (!editing) showCode(answer.data.name, answer.data.code);
    select(answer.data.id);
  }

  function showCode(name, code) {
    $("code-title").textContent = "Code for " + name;
    $("code-value").textContent = code;
    $("code-example").textContent = code + "/their-name";
    $("code-portal").textContent = location.origin + API + "/portal";
    $("code-card").hidden = false;
    $("code-card").focus();
  }

  // Actions, each confirmed

  function confirmed(text, action) {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = action;
    return new Promise((resolve) => {
      const done = (answer) => { dialog.close(); cleanup(); resolve(answer); };
      const yes = () => done(true);
      const no = () => done(false);
      const cleanup = () => {
        $("confirm-ok").removeEventListener("click", yes);
        $("confirm-cancel").removeEventListener("click", no);
        dialog.removeEventListener("cancel", no);
      };
      $("confirm-ok").addEventListener("click", yes);
      $("confirm-cancel").addEventListener("click", no);
      dialog.addEventListener("cancel", no);
      dialog.showModal();
      $("confirm-cancel").focus();
    });
  }

  async function rotate() {
    const event = selected;
    if (!(await confirmed(`Rotate the code of "${event.name}"? The current code stops working within a minute; ` +
        "attendees need the new one.", "Rotate code"))) return;
    const answer = await manage("/events/" + encodeURIComponent(event.id) + "/rotate-code", { method: "POST" });
    if (!answer.ok) { showAlert(answer.message); return; }
    showCode(event.name, answer.data.code);
  }

  async function toggleActive() {
    const event = selected;
    const enable = !event.active;
    if (!enable && !(await confirmed(`Disable "${event.name}"? Attendees are refused until you enable it again.`, "Disable"))) return;
    const answer = await manage("/events/" + encodeURIComponent(event.id), { method: "PATCH", json: { active: enable } });
    if (!answer.ok) { showAlert(answer.message); return; }
    showAlert(`"${event.name}" is ${enable ? "enabled" : "disabled"}. It applies within a minute on every instance.`, "info");
    await loadEvents();
  }

  async function remove() {
    const event = selected;
    if (!(await confirmed(`Delete "${event.name}" and its code? This cannot be undone; its usage is kept for reports.`,
        "Delete event"))) return;
    const answer = await manage("/events/" + encodeURIComponent(event.id), { method: "DELETE" });
    if (!answer.ok) { showAlert(answer.message); return; }
    clearInterval(liveTimer);
    selected = null;
    for (const id of ["detail", "usage", "activity", "plan", "attendees", "code-card"]) $(id).hidden = true;
    showAlert(`"${event.name}" is deleted.`, "info");
    await loadEvents();
  }

  // Usage

  function chart(rows) {
    const ns = "http://www.w3.org/2000/svg";
    const shown = grouping === "day" ? rows.slice().sort((a, b) => (a.key < b.key ? -1 : 1)).slice(-31)
      : rows.slice().sort((a, b) => b.total_tokens - a.total_tokens).slice(0, 20);
    const svg = document.createElementNS(ns, "svg");
    // Drawn at the width it is shown at, so its 11 px labels stay 11 px on a phone.
    const width = Math.max(300, Math.min(704, $("usage-chart").clientWidth || 640));
    const band = 28, label = Math.round(width * 0.25), height = Math.max(1, shown.length) * band + 8;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("class", "chart");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "Requests and tokens per " + (grouping === "user" ? "attendee" : grouping));
    const maxRequests = Math.max(1, ...shown.map((r) => r.requests));
    const maxTokens = Math.max(1, ...shown.map((r) => r.total_tokens));
    const barRoom = width - label - 70;
    const add = (tag, attrs, text) => {
      const node = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
      if (text !== undefined) node.textContent = text;
      svg.append(node);
    };
    shown.forEach((row, i) => {
      const y = i * band + 4;
      const room = Math.floor(label / 7);
      add("text", { x: 0, y: y + 15 }, row.key.length > room ? row.key.slice(0, room - 1) + "…" : row.key);
      const r = Math.max(1, (row.requests / maxRequests) * barRoom);
      const t = Math.max(1, (row.total_tokens / maxTokens) * barRoom);
      add("rect", { class: "requests", x: label, y: y, width: r, height: 10 });
      add("text", { x: label + r + 4, y: y + 9 }, number(row.requests));
      add("rect", { class: "tokens", x: label, y: y + 12, width: t, height: 10 });
      add("text", { x: label + t + 4, y: y + 21 }, number(row.total_tokens));
    });
    return svg;
  }

  async function refreshUsage() {
    if (!selected) return;
    const id = selected.id;
    const answer = await manage("/events/" + encodeURIComponent(id) + "/usage?by=" + grouping);
    if (!selected || selected.id !== id) return;
    if (!answer.ok) { showAlert(answer.message); return; }
    const report = answer.data;
    const totals = report.totals;
    $("usage-totals").textContent = `${number(totals.requests)} request${totals.requests === 1 ? "" : "s"}, ${number(totals.total_tokens)} tokens ` +
      `(${number(totals.prompt_tokens)} prompt, ${number(totals.completion_tokens)} completion, ` +
      `${number(totals.cached_tokens)} of the prompt cached), ${usd(totals.cost)}.` +
      (totals.unpriced_requests ? ` ${number(totals.unpriced_requests)} requests used a model with no known price ` +
        "and are not in the cost: set MODEL_PRICES." : "");
    const budget = report.budget;
    $("usage-budget").hidden = !budget;
    if (budget) {
      const part = (what, figure) => figure && figure.limit !== null && figure.limit !== undefined
        ? `${what} ${number(figure.used)} of ${number(figure.limit)}` : null;
      const parts = [part("requests", budget.requests), part("tokens", budget.tokens),
        budget.cost ? `cost ${usd(budget.cost.used)} of ${usd(budget.cost.limit)}` : null].filter(Boolean);
      $("usage-budget").textContent = "Whole event: " + (parts.length ? parts.join(", ") : "no budget") +
        (budget.exhausted ? " — used up." : ".");
    }
    $("usage-key").textContent = { user: "Attendee", model: "Model", day: `Day (${selected.time_zone})` }[grouping];
    const rows = report.rows;
    $("usage-empty").hidden = rows.length > 0;
    lastRows = rows;
    $("usage-chart").replaceChildren(...(rows.length ? [chart(rows)] : []));
    $("usage-table").querySelector("tbody").replaceChildren(...rows.map((row) => el("tr", {},
      el("td", {}, row.key), el("td", { className: "n" }, number(row.requests)),
      el("td", { className: "n" }, number(row.prompt_tokens)), el("td", { className: "n" }, number(row.completion_tokens)),
      el("td", { className: "n" }, number(row.total_tokens)), el("td", { className: "n" }, number(row.cached_tokens)),
      el("td", { className: "n" }, usd(row.cost) + (row.unpriced_requests ? " *" : "")))));
    $("usage-refreshed").textContent = "Updated " + new Date().toLocaleTimeString("en-GB") +
      ($("live").checked ? ", refreshed every 5 seconds." : ".");
  }

  // Activity: the charts (proxy/static/charts.js)

  let lastActivity = null;

  async function refreshActivity() {
    if (!selected) return;
    const id = selected.id;
    const base = "/events/" + encodeURIComponent(id) + "/usage?by=";
    const [hours, models, users] = await Promise.all(["hour", "model", "user"].map((by) => manage(base + by)));
    if (!selected || selected.id !== id) return;
    const failed = [hours, models, users].find((answer) => !answer.ok);
    if (failed) { showAlert(failed.message); return; }
    lastActivity = { hours: hours.data.rows, models: models.data.rows, users: users.data.rows };
    drawActivity();
  }

  function drawActivity() {
    if (!lastActivity) return;
    const { hours, models, users } = lastActivity;
    const width = Math.max(300, Math.min(704, $("activity").clientWidth - 32 || 640));
    const colourOf = Charts.colours(models.map((row) => row.key));
    const active = hours.some((row) => row.requests > 0);
    $("activity-empty").hidden = active;
    $("activity-legend").replaceChildren(Charts.legend(colourOf));
    $("activity-hours").replaceChildren(...(active ? [
      Charts.hourly(hours, "requests", "Requests", number, colourOf, width),
      Charts.hourly(hours, "total_tokens", "Tokens", number, colourOf, width),
      Charts.hourly(hours, "cost", "Cost (USD)", usd, colourOf, width),
    ] : []));
    const byCost = (rows) => rows.slice().sort((a, b) => b.cost - a.cost || b.total_tokens - a.total_tokens);
    $("activity-models").replaceChildren(...(models.length ? [Charts.bars(
      byCost(models).map((row) => ({ key: row.key, value: row.cost || row.total_tokens,
        label: `${usd(row.cost)} · ${number(row.total_tokens)} tok` })), "Cost by model", width, colourOf)] : []));
    $("activity-top").replaceChildren(...(users.length ? [Charts.bars(
      byCost(users).slice(0, 10).map((row) => ({ key: row.key, value: row.cost || row.total_tokens,
        label: `${usd(row.cost)} · ${number(row.requests)} req` })), "Top attendees by cost", width)] : []));
  }

  // Plan: will the quota hold, what can it cost (proxy/manage/plan.py)

  async function showPlan(submitted) {
    submitted.preventDefault();
    if (!selected) return;
    const query = new URLSearchParams();
    const attendees = $("plan-attendees").value.trim();
    if (attendees) query.set("attendees", attendees);
    for (const pair of $("plan-tpm").value.split(",").map((p) => p.trim()).filter(Boolean)) query.append("tpm", pair);
    const answer = await manage("/events/" + encodeURIComponent(selected.id) + "/plan?" + query.toString());
    if (!answer.ok) { showAlert(answer.message); return; }
    clearAlert();
    const plan = answer.data;
    const money = (value) => (value === null ? "no cap bounds it" : usd(value));
    const head = el("p", {}, `${number(plan.attendees)} attendees (${plan.attendees_from}), ${plan.days} ` +
      `day${plan.days === 1 ? "" : "s"}, open up to ${number(plan.open_minutes_per_day)} minutes a day.`);
    const blocks = plan.models.map((model) => {
      const verdict = model.holds === null ? el("span", {}, "not checked (no quota known)")
        : el("span", { className: model.holds ? "good" : "bad" }, model.holds ? "holds" : "does not hold");
      const peak = model.peak_tpm === null ? "unbounded (no tokens-per-minute cap)" : number(model.peak_tpm) + " TPM";
      const quota = model.quota_tpm === null ? "unknown" : `${number(model.quota_tpm)} TPM (${model.quota_from})`;
      const typical = model.typical_request;
      return el("div", { className: "plan-model" }, el("h3", {}, model.model), el("dl", {},
        el("dt", {}, "Peak at full use"), el("dd", {}, `${peak} against ${quota}: `, verdict),
        el("dt", {}, "Largest cost"), el("dd", {}, `${money(model.max_cost_per_day)} a day, ` +
          `${money(model.max_cost_event)} for the whole event`),
        el("dt", {}, "Typical request"), el("dd", {}, `${number(typical.prompt_tokens)} prompt + ` +
          `${number(typical.completion_tokens)} completion tokens = ${money(typical.cost)} (${typical.from})`)),
        ...(model.changes.length ? [el("ul", {}, ...model.changes.map((change) => el("li", {}, change)))] : []));
    });
    $("plan-result").replaceChildren(head, ...blocks);
  }

  async function downloadCsv() {
    const event = selected;
    const answer = await manage("/events/" + encodeURIComponent(event.id) + "/usage?by=" + grouping,
      { headers: { accept: "text/csv" }, raw: true });
    if (!answer.ok) { showAlert(answer.message); return; }
    const disposition = answer.response.headers.get("content-disposition") || "";
    const named = /filename="?([^";]+)"?/.exec(disposition);
    const link = el("a", { href: URL.createObjectURL(answer.data), download: named ? named[1] : `${event.id}-usage-by-${grouping}.csv` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  // Attendees: shown once the API answers them (an older proxy has no such route)

  async function refreshAttendees() {
    if (!selected) return;
    const id = selected.id;
    const answer = await manage("/events/" + encodeURIComponent(id) + "/attendees");
    if (!selected || selected.id !== id) return;
    $("attendees").hidden = !answer.ok;
    if (!answer.ok) return;
    const list = answer.data;
    const writable = mayChange(selected);
    $("attendees-count").textContent = number(list.count) + " attendee" + (list.count === 1 ? "" : "s") +
      (list.max_attendees ? " of at most " + number(list.max_attendees) : "") + ".";
    $("attendees-table").querySelector("tbody").replaceChildren(...list.data.map((a) => el("tr", {},
      el("td", {}, el("strong", {}, a.user)),
      el("td", { "data-label": "First seen" }, a.first_seen ? localTime(a.first_seen, selected.time_zone) : "—"),
      el("td", { className: "n", "data-label": "Requests" }, number(a.requests)),
      el("td", { className: "n", "data-label": "Tokens" }, number(a.total_tokens)),
      el("td", { "data-label": "Personal key" }, !a.personal_key ? "—" : !writable ? "yes" : el("button", {
        type: "button", className: "quiet", "aria-label": "Reset the personal key of " + a.user,
        onclick: () => resetKey(id, a.user) }, "Reset key")),
      el("td", { "data-label": "Blocked" }, !writable ? (a.blocked ? "blocked" : "—") : el("button", {
        type: "button", className: a.blocked ? "quiet" : "danger", "aria-label": (a.blocked ? "Unblock " : "Block ") + a.user,
        onclick: () => block(id, a.user, !a.blocked) }, a.blocked ? "Unblock" : "Block")))));
  }

  async function resetKey(id, user) {
    if (!(await confirmed(`Reset the personal key of ${user}? It stops working, and the name can register again.`,
        "Reset key"))) return;
    const answer = await manage("/events/" + encodeURIComponent(id) + "/attendees/" + encodeURIComponent(user) +
      "/reset-key", { method: "POST" });
    if (!answer.ok) { showAlert(answer.message); return; }
    showAlert(`The personal key of ${user} is reset. ${user} can register again at /api/portal.`, "info");
    refreshAttendees();
  }

  async function block(id, user, blocked) {
    const answer = await manage("/events/" + encodeURIComponent(id) + "/attendees/" + encodeURIComponent(user),
      { method: "PATCH", json: { blocked: blocked } });
    if (!answer.ok) { showAlert(answer.message); return; }
    showAlert(`${user} is ${blocked ? "blocked" : "unblocked"}. It applies within a minute on every instance.`, "info");
    refreshAttendees(); refreshAudit();
  }

  // Audit log: this event's changes, or every change the account may see (proxy.policy.audit)

  let auditScope = "event";

  function shownValue(value) {
    if (value === null || value === undefined) return "—";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  async function refreshAudit() {
    const scope = selected && auditScope === "event" ? selected.id : null;
    const answer = await manage(scope ? "/audit?event=" + encodeURIComponent(scope) : "/audit");
    if ((selected && auditScope === "event" ? selected.id : null) !== scope) return;  // switched meanwhile
    $("audit").hidden = !answer.ok;
    if (!answer.ok) return;
    const entries = answer.data.data.slice(0, 200);
    $("audit-empty").hidden = entries.length > 0;
    const zone = selected ? selected.time_zone : undefined;
    $("audit-table").querySelector("tbody").replaceChildren(...entries.map((e) => el("tr", {},
      el("td", { "data-label": "When" }, localTime(e.time, zone)),
      el("td", { "data-label": "Account" }, e.account + (e.via === "cli" ? " (CLI)" : "")),
      el("td", { "data-label": "Action" }, el("strong", {}, e.action)),
      el("td", { "data-label": "Event" }, e.event_id || "—"),
      el("td", { "data-label": "Target" }, e.target || "—"),
      el("td", { "data-label": "Changes" }, Object.entries(e.changes).map(([name, change]) =>
        name + ": " + shownValue(change.old) + " → " + shownValue(change.new)).join("; ") || "—"))));
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (document.body.dataset.entra === "on") $("entra").hidden = false;
    let zones = ["UTC"];
    try { zones = Intl.supportedValuesOf("timeZone"); } catch (_) { /* an older browser: free entry only */ }
    $("zones").replaceChildren(...zones.map((z) => el("option", { value: z })));
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      signIn($("organizer-key").value.trim());
    });
    $("sign-out").addEventListener("click", signOut);
    $("new-event").addEventListener("click", () => openEditor(null));
    $("reload").addEventListener("click", loadEvents);
    $("editor-cancel").addEventListener("click", () => { $("editor").hidden = true; });
    $("event-form").addEventListener("submit", save);
    $("code-copy").addEventListener("click", () => copy($("code-value").textContent, $("code-copy")));
    $("code-done").addEventListener("click", () => { $("code-card").hidden = true; $("code-value").textContent = ""; });
    $("edit-event").addEventListener("click", () => openEditor(selected));
    $("rotate-code").addEventListener("click", rotate);
    $("toggle-active").addEventListener("click", toggleActive);
    $("delete-event").addEventListener("click", remove);
    $("csv").addEventListener("click", downloadCsv);
    // A group of tabs: one pressed at a time, and what to do with the pressed one.
    function tabs(selector, chosen) {
      const all = document.querySelectorAll(selector);
      for (const tab of all) {
        tab.addEventListener("click", () => {
          for (const other of all) other.setAttribute("aria-pressed", String(other === tab));
          chosen(tab);
        });
      }
    }
    tabs("#audit-scope button", (tab) => { auditScope = tab.dataset.scope; refreshAudit(); });
    tabs("#usage .tabs button", (tab) => { grouping = tab.dataset.by; refreshUsage(); });
    $("plan-form").addEventListener("submit", showPlan);
    window.addEventListener("resize", () => {
      if (!$("activity").hidden) drawActivity();
      if (lastRows.length && !$("usage").hidden) $("usage-chart").replaceChildren(chart(lastRows));
    });
    if (key) signIn(key);
    else if (document.body.dataset.entra === "on") signIn(null);
    else $("organizer-key").focus();
  });
})();
