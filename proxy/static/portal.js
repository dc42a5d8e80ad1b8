/* The attendee page: the event, today's figures, snippets and a streaming playground.
   The credential lives in this tab's sessionStorage and travels only in the Authorization header. */
"use strict";
(function () {
  const { API, call, el, $, copy, showAlert, clearAlert, number, duration, localTime, session } = window.Portal;
  const KEY = "eventproxy.attendee";
  const REFRESH_MS = 15000;
  let credential = session.get(KEY);
  let info = null;
  let refreshTimer = null;
  let conversation = [];
  let running = null; // the AbortController of the answer being streamed

  function auth() { return { authorization: "Bearer " + credential }; }

  function signOut(message) {
    session.remove(KEY);
    credential = null;
    info = null;
    conversation = [];
    clearInterval(refreshTimer);
    $("event").hidden = true;
    $("sign-out").hidden = true;
    $("key-shown").hidden = true;
    $("sign-in").hidden = false;
    $("register").hidden = false;
    $("credential").value = "";
    $("transcript").replaceChildren();
    document.title = "Event portal";
    $("title").textContent = "Event portal";
    if (message) showAlert(message); else clearAlert();
    $("credential").focus();
  }

  function state(event) {
    const now = Date.now();
    if (!event.active) return { key: "disabled", label: "Switched off", text: "The organizer has switched this event off." };
    if (event.blocked) return { key: "blocked", label: "Blocked", text: "The organizer has blocked the name " + event.user + "." };
    if (now < Date.parse(event.start)) {
      return { key: "upcoming", label: "Not started", text: "Opens in " + duration(Date.parse(event.start) - now) + "." };
    }
    if (now >= Date.parse(event.end)) return { key: "ended", label: "Ended", text: "This event has ended." };
    return { key: "open", label: "Open", text: "Closes in " + duration(Date.parse(event.end) - now) + "." };
  }

  function tick() {
    if (!info) return;
    const now = state(info);
    const badge = $("event-state");
    badge.textContent = now.label;
    badge.className = "badge " + now.key;
    $("countdown").textContent = now.text;
    if (info.event_budget_exhausted && now.key === "open") {
      $("countdown").textContent = now.text + " The event's shared budget is used up.";
    }
  }

  function capped(remaining, cap, open) {
    if (cap === null || cap === undefined) return open ? "no daily cap" : "none while closed";
    return number(remaining) + " of " + number(cap) + (open ? "" : " (closed)");
  }

  function render(event) {
    info = event;
    document.title = event.name + " · Event portal";
    $("title").textContent = event.name;
    $("event-name").textContent = event.name;
    $("event-description").textContent = event.description || "";
    $("event-description").hidden = !event.description;
    $("event-start").textContent = localTime(event.start, event.time_zone);
    $("event-end").textContent = localTime(event.end, event.time_zone);
    $("event-zone").textContent = event.time_zone;
    $("event-user").textContent = event.user;
    $("usage-day").textContent = event.usage_today.day;
    $("usage-zone").textContent = event.time_zone;
    $("resets-at").textContent = event.usage_today.resets_at_local;
    $("used-requests").textContent = number(event.usage_today.requests);
    $("used-tokens").textContent = number(event.usage_today.total_tokens);
    $("remaining-requests").textContent = capped(event.remaining_today.requests, event.caps.daily_requests, event.open);
    $("remaining-tokens").textContent = capped(event.remaining_today.tokens, event.caps.daily_tokens, event.open);
    $("cap-tpm").textContent = event.caps.tpm ? number(event.caps.tpm) : "no limit";
    $("cap-max-tokens").textContent = number(event.caps.max_tokens);
    $("refreshed").textContent = "Last refreshed " + new Date().toLocaleTimeString("en-GB") + ".";
    $("models").replaceChildren(...event.models.map((m) => el("li", { className: "chip" }, m)));
    tick();
  }

  function chatModels(models) {
    const chat = models.filter((m) => !/embed/i.test(m));
    return chat.length ? chat : models;
  }

  function fillModels(models) {
    const select = $("chat-model");
    const chosen = select.value;
    select.replaceChildren(...chatModels(models).map((m) => el("option", { value: m }, m)));
    if (models.includes(chosen)) select.value = chosen;
  }

  /** Ready-to-paste snippets with this credential (a personal key or CODE/name), into a container. */
  function snippets(container, secret, models) {
    const base = location.origin + API;
    const model = chatModels(models)[0] || "MODEL";
    const hello = '[{"role": "user", "content": "Hello!"}]';
    const texts = [
      ["Python: OpenAI", [
        "from openai import OpenAI", "",
        `client = OpenAI(base_url="${base}/v1", api_key="${secret}")`,
        `reply = client.chat.completions.create(`,
        `    model="${model}", messages=[{"role": "user", "content": "Hello!"}]`, ")",
        "print(reply.choices[0].message.content)"]],
      ["Python: AzureOpenAI", [
        "from openai import AzureOpenAI", "",
        "client = AzureOpenAI(",
        `    azure_endpoint="${base}/v1", api_key="${secret}", api_version="2024-10-21"`, ")",
        `reply = client.chat.completions.create(`,
        `    model="${model}", messages=[{"role": "user", "content": "Hello!"}]`, ")",
        "print(reply.choices[0].message.content)"]],
      ["Python: LangChain", [
        "from langchain_openai import ChatOpenAI", "",
        `llm = ChatOpenAI(base_url="${base}/v1", api_key="${secret}", model="${model}")`,
        'print(llm.invoke("Hello!").content)']],
      ["JavaScript: openai", [
        'import OpenAI from "openai";', "",
        `const client = new OpenAI({ baseURL: "${base}/v1", apiKey: "${secret}" });`,
        "const reply = await client.chat.completions.create({",
        `  model: "${model}", messages: [{ role: "user", content: "Hello!" }],`, "});",
        "console.log(reply.choices[0].message.content);"]],
      ["curl", [
        `curl ${base}/v1/chat/completions \\`,
        `  -H "Authorization: Bearer ${secret}" \\`,
        '  -H "Content-Type: application/json" \\',
        `  -d '{"model": "${model}", "messages": ${hello}}'`]],
      [".env (read by the OpenAI SDKs)", [
        `OPENAI_BASE_URL=${base}/v1`,
        `OPENAI_API_KEY=${secret}`]],
    ];
    const template = $("snippet-template");
    container.replaceChildren(...texts.map(([title, lines]) => {
      const figure = template.content.firstElementChild.cloneNode(true);
      const text = lines.join("\n");
      figure.querySelector(".snippet-title").textContent = title;
      figure.querySelector("code").textContent = text;
      const button = figure.querySelector(".copy");
      button.setAttribute("aria-label", "Copy the " + title + " snippet");
      button.addEventListener("click", () => copy(text, button));
      return figure;
    }));
  }

  // Registering a personal key: shown once, with snippets; the page then uses it as the credential.

  const github = document.body.dataset.github === "on";

  async function register(event) {
    event.preventDefault();
    clearAlert();
    const body = { code: $("register-code").value.trim() };
    if (!github) body.name = $("register-name").value.trim();
    $("register-submit").disabled = true;
    const headers = github ? { "x-attendee-portal": "1" } : {};
    const answer = await call("/v1/keys", { method: "POST", json: body, headers: headers });
    $("register-submit").disabled = false;
    if (!answer.ok) {
      if (answer.code === "sign_in_required") $("github").hidden = false;
      showAlert(answer.message);
      return;
    }
    const key = answer.data.key;
    $("register-form").reset();
    credential = key;
    session.set(KEY, credential);
    $("new-key").textContent = key;
    $("sign-in").hidden = true;
    $("register").hidden = true;
    $("key-shown").hidden = false;
    $("copy-key").focus();
    // The models for the snippets: the event's list, as the key sees it.
    const info = await call("/v1/event", { headers: auth() });
    snippets($("key-snippets"), key, info.ok ? info.data.models : []);
  }

  function leaveKey() {
    $("key-shown").hidden = true;
    $("new-key").textContent = "";
    $("key-snippets").replaceChildren();
    open();
  }

  async function refresh() {
    if (!credential) return false;
    const answer = await call("/v1/event", { headers: auth() });
    if (!answer.ok) {
      if (answer.status === 401) signOut(answer.message);
      else showAlert(answer.message, "error stale");
      return false;
    }
    if ($("alert").classList.contains("stale")) clearAlert();
    render(answer.data);
    return true;
  }

  async function open() {
    clearAlert();
    if (!(await refresh())) return;
    $("sign-in").hidden = true;
    $("register").hidden = true;
    $("event").hidden = false;
    $("sign-out").hidden = false;
    $("base-url").textContent = location.origin + API + "/v1";
    snippets($("snippets"), credential, info.models);
    fillModels(info.models);
    // The models the proxy answers for now (it refuses outside the window: the event's list stands in).
    const models = await call("/v1/models", { headers: auth() });
    if (models.ok) fillModels(models.data.data.map((m) => m.id));
    clearInterval(refreshTimer);
    refreshTimer = setInterval(refresh, REFRESH_MS);
  }

  // Playground

  function bubble(role, text) {
    const body = el("div", { className: "text" }, text || "");
    const node = el("div", { className: "message " + role }, el("div", { className: "who" }, role === "user" ? "You" : "Assistant"), body);
    $("transcript").append(node);
    node.scrollIntoView({ block: "nearest" });
    return { node, body };
  }

  function setRunning(controller) {
    running = controller;
    $("chat-send").disabled = !!controller;
    $("chat-stop").disabled = !controller;
  }

  async function send(event) {
    event.preventDefault();
    if (running) return;
    const prompt = $("chat-prompt").value.trim();
    if (!prompt) return;
    $("chat-prompt").value = "";
    conversation.push({ role: "user", content: prompt });
    bubble("user", prompt);
    const answer = bubble("assistant", "");
    answer.node.classList.add("pending");
    const controller = new AbortController();
    setRunning(controller);
    $("chat-status").textContent = "Waiting for the answer…";
    let text = "";
    let usage = null;
    let failure = null;
    try {
      const response = await fetch(API + "/v1/chat/completions", {
        method: "POST", cache: "no-store", referrerPolicy: "no-referrer", signal: controller.signal,
        headers: Object.assign({ "content-type": "application/json" }, auth()),
        body: JSON.stringify({
          model: $("chat-model").value, messages: conversation, stream: true, stream_options: { include_usage: true },
        }),
      });
      if (!response.ok) {
        let body = null;
        try { body = await response.json(); } catch (_) { body = null; }
        failure = body && body.error ? body.error.message : "The proxy answered " + response.status + ".";
      } else {
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        $("chat-status").textContent = "Answering…";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          const events = buffer.split(/\r?\n\r?\n/);
          buffer = events.pop();
          for (const block of events) {
            for (const line of block.split(/\r?\n/)) {
              if (!line.startsWith("data:")) continue;
              const data = line.slice(5).trim();
              if (data === "[DONE]") continue;
              let chunk;
              try { chunk = JSON.parse(data); } catch (_) { continue; }
              if (chunk.error) { failure = chunk.error.message; continue; }
              if (chunk.usage) usage = chunk.usage;
              const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
              if (delta && delta.content) {
                text += delta.content;
                answer.body.textContent = text;
              }
            }
          }
        }
      }
    } catch (error) {
      if (error && error.name === "AbortError") failure = "stopped";
      else failure = "The answer broke off: the proxy could not be reached.";
    }
    answer.node.classList.remove("pending");
    setRunning(null);
    if (text) conversation.push({ role: "assistant", content: text });
    else conversation.pop(); // nothing came back: the question is not part of the conversation
    if (failure === "stopped") {
      $("chat-status").textContent = "Stopped." + (text ? "" : " Nothing was answered.");
      answer.node.classList.add("stopped");
      if (!text) answer.body.textContent = "(stopped)";
    } else if (failure) {
      answer.node.classList.add("failed");
      answer.body.textContent = (text ? text + "\n\n" : "") + failure;
      $("chat-status").textContent = "";
    }
    if (usage) {
      const used = el("div", { className: "used" },
        "Used " + number(usage.total_tokens) + " tokens (" + number(usage.prompt_tokens) + " prompt, " +
        number(usage.completion_tokens) + " answer)");
      answer.node.append(used);
      $("chat-status").textContent = "Done: " + number(usage.total_tokens) + " tokens.";
    }
    refresh();
  }

  function stop() {
    if (running) running.abort();
  }

  function clear() {
    stop();
    conversation = [];
    $("transcript").replaceChildren();
    $("chat-status").textContent = "";
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const given = $("credential").value.trim();
      if (!given.includes("/") && !given.startsWith("ek-")) {
        showAlert("Enter your personal key (ek-...), or the event code, a slash and your name, like CODE/ada.");
        return;
      }
      credential = given;
      session.set(KEY, credential);
      open();
    });
    $("sign-out").addEventListener("click", () => signOut());
    $("chat-form").addEventListener("submit", send);
    $("chat-prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send(event);
    });
    $("chat-stop").addEventListener("click", stop);
    $("chat-clear").addEventListener("click", clear);
    $("register-form").addEventListener("submit", register);
    $("copy-key").addEventListener("click", () => copy($("new-key").textContent, $("copy-key")));
    $("key-continue").addEventListener("click", leaveKey);
    if (github) {
      $("github").hidden = false;
      $("register-name-field").hidden = true;
      $("register-name").required = false;
    }
    setInterval(tick, 1000);
    if (credential) open(); else $("credential").focus();
  });
})();
