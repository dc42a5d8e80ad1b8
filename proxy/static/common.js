/* Helpers shared by the attendee and organizer pages. No dependency, no inline script (CSP). */
"use strict";
(function () {
  // The API lives beside the pages: /api/portal and /api/manage/portal -> /api
  const API = location.pathname.replace(/\/(manage\/)?portal\/?$/, "");

  /** Call the proxy's API; resolves to {ok, status, data, message, code, response}. Never throws on HTTP errors. */
  async function call(path, options) {
    const opts = options || {};
    const headers = Object.assign({}, opts.headers || {});
    let body;
    if (opts.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    let response;
    try {
      response = await fetch(API + path, {
        method: opts.method || "GET", headers: headers, body: body,
        cache: "no-store", credentials: "same-origin", referrerPolicy: "no-referrer", signal: opts.signal,
      });
    } catch (error) {
      if (error && error.name === "AbortError") throw error;
      return { ok: false, status: 0, data: null, code: "network_error",
               message: "The proxy could not be reached. Check your network and try again." };
    }
    const type = response.headers.get("content-type") || "";
    let data = null;
    if (opts.raw) {
      data = response.ok ? await response.blob() : null;
    } else if (type.includes("json")) {
      try { data = await response.json(); } catch (_) { data = null; }
    }
    if (opts.raw && !response.ok && type.includes("json")) {
      try { data = await response.json(); } catch (_) { data = null; }
    }
    const error = !response.ok && data && data.error ? data.error : null;
    return {
      ok: response.ok, status: response.status, data: response.ok ? data : null, response: response,
      code: error ? error.code : (response.ok ? null : "http_" + response.status),
      message: error ? error.message : (response.ok ? null : "The proxy answered " + response.status + "."),
    };
  }

  /** Build an element: el("td", {className: "n"}, "text", child) — text only, never HTML. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "className" || key === "textContent" || key === "value" || key === "disabled" ||
          key === "checked" || key === "hidden" || key === "type") {
        node[key] = value;
      } else if (key.startsWith("on")) {
        node.addEventListener(key.slice(2), value);
      } else {
        node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function $(id) { return document.getElementById(id); }

  /** Copy text to the clipboard; the button says so for a moment. */
  async function copy(text, button) {
    let done = false;
    try {
      await navigator.clipboard.writeText(text);
      done = true;
    } catch (_) {
      // No clipboard API (plain http away from localhost): select a hidden field and copy that.
      const area = el("textarea", { className: "offscreen", "aria-hidden": "true" });
      area.value = text;
      document.body.append(area);
      area.select();
      try { done = document.execCommand("copy"); } catch (_) { done = false; }
      area.remove();
    }
    if (button) {
      const label = button.dataset.label || button.textContent;
      button.dataset.label = label;
      button.textContent = done ? "Copied" : "Copy failed: select and copy by hand";
      setTimeout(() => { button.textContent = label; }, 2000);
    }
    return done;
  }

  function showAlert(message, kind) {
    const box = $("alert");
    box.textContent = message;
    box.className = "alert " + (kind || "error");
    box.hidden = !message;
  }

  function clearAlert() { showAlert(""); }

  function number(value) {
    return value === null || value === undefined ? "—" : Number(value).toLocaleString("en-US");
  }

  /** USD: cents from one cent up, more digits below (a workshop's requests cost fractions of a cent). */
  function usd(value) {
    if (value === null || value === undefined) return "—";
    const amount = Number(value);
    const digits = amount === 0 || amount >= 1 ? 2 : amount >= 0.01 ? 4 : 6;
    return "$" + amount.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  /** "2 h 5 min", "3 min 20 s" */
  function duration(ms) {
    let seconds = Math.max(0, Math.round(ms / 1000));
    const days = Math.floor(seconds / 86400); seconds -= days * 86400;
    const hours = Math.floor(seconds / 3600); seconds -= hours * 3600;
    const minutes = Math.floor(seconds / 60); seconds -= minutes * 60;
    if (days) return days + " d " + hours + " h";
    if (hours) return hours + " h " + minutes + " min";
    if (minutes) return minutes + " min " + seconds + " s";
    return seconds + " s";
  }

  /** A moment as the event's time zone shows it, e.g. "Sat 21 Nov 2026, 09:00 CET". */
  function localTime(iso, zone) {
    try {
      return new Intl.DateTimeFormat("en-GB", {
        timeZone: zone || "UTC", weekday: "short", day: "numeric", month: "short", year: "numeric",
        hour: "2-digit", minute: "2-digit", timeZoneName: "short",
      }).format(new Date(iso));
    } catch (_) {
      return iso;
    }
  }

  /** The storage of this tab only: forgotten when the tab closes, never sent anywhere by itself. */
  const session = {
    get(key) { try { return sessionStorage.getItem(key); } catch (_) { return null; } },
    set(key, value) { try { sessionStorage.setItem(key, value); } catch (_) { /* private mode */ } },
    remove(key) { try { sessionStorage.removeItem(key); } catch (_) { /* private mode */ } },
  };

  window.Portal = { API, call, el, $, copy, showAlert, clearAlert, number, usd, duration, localTime, session };
})();
