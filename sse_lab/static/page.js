// The classroom page: one prompt, three readers of the same answer.
//   streamed  new EventSource('/api/chat/stream?...'): text appended on each `token` event
//   buffered  fetch('/api/chat?...'): the whole text when the body arrives
//   fetch     fetch('/api/chat/stream?...') read with a ReadableStream and the small SSE parser below
// Text goes into the page with append()/textContent only, never innerHTML: a token is text, whatever it holds.
// Every time is performance.now() in ms since the reader sent its request. window.sseLab holds the
// measurements for the kit's tests and notebook 06 (sse_lab.experiments.browser).
"use strict";

(() => {
  const MODEL_KNOBS = ["prompt", "model", "max_tokens", "ttft_ms", "token_ms", "jitter_ms", "seed"];
  const STREAM_KNOBS = ["drop_after", "fail_after", "blocklist", "context_window"];
  const READERS = ["streamed", "buffered", "fetch"];
  const LOG_ROWS = 2000; // the table keeps the latest rows; sseLab.log keeps them all
  const $ = (id) => document.getElementById(id);

  const lab = { runs: {}, log: [], many: null, start, openMany, protocol };
  window.sseLab = lab;

  function query(names) {
    const form = new FormData($("knobs"));
    const params = new URLSearchParams();
    for (const name of names) {
      const value = form.get(name);
      if (name === "prompt" || (value !== null && String(value).trim() !== "")) params.set(name, value ?? "");
    }
    return params;
  }

  function fillForm(params) {
    const form = $("knobs");
    for (const name of [...MODEL_KNOBS, ...STREAM_KNOBS]) {
      if (params.has(name) && form.elements[name]) form.elements[name].value = params.get(name);
    }
  }

  const ms = (value) => `${Math.round(value)} ms`;

  function newRun(reader) {
    lab.runs[reader]?.close?.();
    const run = {
      reader,
      startedAt: performance.now(),
      ttftMs: null,
      firstPaintMs: null, // the first animation frame after the first token was in the DOM
      tokens: 0,
      endMs: null,
      outcome: null, // done, error, dropped, failed, stopped
      error: null,
      drops: [], // {atMs, lastEventId, resumedMs}
      close: null,
    };
    lab.runs[reader] = run;
    $(`${reader}-text`).replaceChildren();
    $(`${reader}-error`).textContent = "";
    $(`${reader}-ttft`).textContent = "…";
    $(`${reader}-tokens`).textContent = "0";
    $(`${reader}-end`).textContent = "–";
    status(run, "waiting for the first token");
    return run;
  }

  const since = (run) => performance.now() - run.startedAt;

  function status(run, text) {
    $(`${run.reader}-status`).textContent = text;
  }

  function firstToken(run) {
    run.ttftMs = since(run);
    $(`${run.reader}-ttft`).textContent = ms(run.ttftMs);
    requestAnimationFrame(() => {
      run.firstPaintMs = since(run);
    });
    status(run, "receiving");
  }

  function addText(run, text, tokens) {
    $(`${run.reader}-text`).append(text); // a text node: markup in a token stays text
    if (run.ttftMs === null) firstToken(run);
    run.tokens += tokens;
    $(`${run.reader}-tokens`).textContent = String(run.tokens);
  }

  function markDrop(run, lastEventId) {
    const mark = document.createElement("span");
    mark.className = "drop-mark"; // its ⚡ is CSS generated content: the text's textContent stays exact
    mark.title = `connection lost after id ${lastEventId || "none"}`;
    $(`${run.reader}-text`).append(mark);
    run.drops.push({ atMs: since(run), lastEventId, resumedMs: null });
  }

  function finish(run, outcome, detail) {
    if (run.outcome !== null) return;
    run.outcome = outcome;
    run.endMs = since(run);
    $(`${run.reader}-end`).textContent = ms(run.endMs);
    status(run, detail);
  }

  function showError(run, error) {
    run.error = error;
    $(`${run.reader}-error`).textContent = `${error.code}: ${error.message}`;
  }

  function log(run, event, id, data) {
    const at = since(run);
    lab.log.push({ atMs: at, reader: run.reader, event, id, data });
    const row = document.createElement("tr");
    for (const cell of [at.toFixed(1), run.reader, event, id, data]) {
      const td = document.createElement("td");
      td.textContent = cell;
      row.append(td);
    }
    const body = $("log");
    body.append(row);
    if (body.rows.length > LOG_ROWS) body.deleteRow(0);
  }

  function startStreamed() {
    const run = newRun("streamed");
    const url = `/api/chat/stream?${query([...MODEL_KNOBS, ...STREAM_KNOBS])}`;
    const source = new EventSource(url);
    run.close = () => {
      source.close();
      finish(run, "stopped", "stopped");
    };
    let lastEventId = "";
    source.addEventListener("open", () => log(run, "(open)", "", ""));
    source.addEventListener("token", (event) => {
      const drop = run.drops.at(-1);
      if (drop && drop.resumedMs === null) drop.resumedMs = since(run);
      lastEventId = event.lastEventId;
      addText(run, JSON.parse(event.data).token, 1);
      log(run, "token", event.lastEventId, event.data);
    });
    source.addEventListener("done", (event) => {
      log(run, "done", event.lastEventId, event.data);
      source.close();
      const drops = run.drops.length ? `, resumed after ${run.drops.length} drop(s)` : "";
      finish(run, "done", `done: ${JSON.parse(event.data).finish_reason}${drops}`);
    });
    source.addEventListener("error", (event) => {
      if (event instanceof MessageEvent) {
        // The server's `error` event (it has data); a lost connection is a plain Event.
        log(run, "error", event.lastEventId, event.data);
        source.close();
        showError(run, JSON.parse(event.data));
        finish(run, "error", "ended by an error event");
      } else if (run.outcome === null && source.readyState === EventSource.CONNECTING) {
        log(run, "(connection lost)", lastEventId, "");
        markDrop(run, lastEventId);
        status(run, `connection lost after id ${lastEventId || "none"}: reconnecting with Last-Event-ID`);
      } else if (run.outcome === null) {
        log(run, "(connection failed)", lastEventId, "");
        finish(run, "failed", "connection failed: EventSource gave up");
      }
    });
  }

  async function startBuffered() {
    const run = newRun("buffered");
    const controller = new AbortController();
    run.close = () => controller.abort();
    try {
      const response = await fetch(`/api/chat?${query(MODEL_KNOBS)}`, { signal: controller.signal, cache: "no-store" });
      const body = await response.json();
      log(run, `(HTTP ${response.status})`, "", JSON.stringify(body));
      if (!response.ok) {
        showError(run, { code: body.error, message: body.reason ?? "" });
        finish(run, "error", `refused: HTTP ${response.status}`);
        return;
      }
      addText(run, body.text, body.tokens);
      finish(run, "done", `done: ${body.finish_reason}`);
    } catch (error) {
      finish(run, error.name === "AbortError" ? "stopped" : "failed", String(error));
    }
  }

  // A Server-Sent Events parser, as the HTML standard has it: lines end in CRLF, LF or CR;
  // a blank line dispatches the event; `data` lines join with LF; the last id sticks.
  function sseParser(onEvent) {
    let buffer = "";
    let skipLF = false; // a CR ended the last chunk: an LF opening the next one is part of it
    let data = [];
    let type = "";
    let lastEventId = "";
    const line = (text) => {
      if (text === "") {
        if (data.length) onEvent({ type: type || "message", data: data.join("\n"), lastEventId });
        data = [];
        type = "";
        return;
      }
      if (text.startsWith(":")) return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "event") type = value;
      else if (field === "id" && !value.includes("\0")) lastEventId = value;
    };
    return (chunk) => {
      if (skipLF && chunk.startsWith("\n")) chunk = chunk.slice(1);
      skipLF = false;
      buffer += chunk;
      let start = 0;
      for (let i = 0; i < buffer.length; i++) {
        const c = buffer[i];
        if (c !== "\n" && c !== "\r") continue;
        line(buffer.slice(start, i));
        if (c === "\r") {
          if (i + 1 === buffer.length) skipLF = true;
          else if (buffer[i + 1] === "\n") i++;
        }
        start = i + 1;
      }
      buffer = buffer.slice(start);
    };
  }

  async function startFetch() {
    const run = newRun("fetch");
    const controller = new AbortController();
    run.close = () => controller.abort();
    let lastEventId = "";
    const feed = sseParser((event) => {
      log(run, event.type, event.lastEventId, event.data);
      lastEventId = event.lastEventId;
      if (event.type === "token") addText(run, JSON.parse(event.data).token, 1);
      else if (event.type === "done") finish(run, "done", `done: ${JSON.parse(event.data).finish_reason}`);
      else if (event.type === "error") {
        showError(run, JSON.parse(event.data));
        finish(run, "error", "ended by an error event");
      }
    });
    try {
      const url = `/api/chat/stream?${query([...MODEL_KNOBS, ...STREAM_KNOBS])}`;
      const response = await fetch(url, {
        headers: { Accept: "text/event-stream" },
        signal: controller.signal,
        cache: "no-store",
      });
      if (!response.ok) {
        const body = await response.json();
        showError(run, { code: body.error, message: `${body.parameter ?? ""} ${body.reason ?? ""}`.trim() });
        finish(run, "error", `refused: HTTP ${response.status}`);
        return;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        feed(value);
      }
      if (run.outcome === null) {
        markDrop(run, lastEventId);
        finish(run, "dropped", `connection lost after id ${lastEventId || "none"}: fetch does not reconnect by itself`);
      }
    } catch (error) {
      finish(run, error.name === "AbortError" ? "stopped" : "failed", String(error));
    }
  }

  function startAll() {
    lab.log = [];
    $("log").replaceChildren();
    startStreamed();
    startBuffered();
    startFetch();
  }

  // One reader on its own, with the form's values: start("streamed"), start("buffered"), start("fetch").
  function start(reader) {
    ({ streamed: startStreamed, buffered: startBuffered, fetch: startFetch })[reader]();
  }

  function stopAll() {
    for (const reader of READERS) lab.runs[reader]?.close?.();
  }

  function tick() {
    for (const reader of READERS) {
      const run = lab.runs[reader];
      if (run) $(`${reader}-clock`).textContent = `${((run.endMs ?? since(run)) / 1000).toFixed(2)} s`;
    }
    if (lab.many) showMany(lab.many);
    requestAnimationFrame(tick);
  }

  function showMany(many) {
    const body = $("many");
    while (body.rows.length < many.streams.length) {
      const row = body.insertRow();
      for (let column = 0; column < 4; column++) row.insertCell();
    }
    many.streams.forEach((stream, index) => {
      const state = stream.outcome ?? (stream.firstTokenMs === null ? "waiting for a connection" : "receiving");
      const cells = [`#${index + 1}`, state, stream.firstTokenMs?.toFixed(0) ?? "", stream.endMs?.toFixed(0) ?? ""];
      cells.forEach((text, column) => {
        body.rows[index].cells[column].textContent = text;
      });
      body.rows[index].className = state.startsWith("waiting") ? "waiting" : "";
    });
  }

  function openManyFromForm() {
    $("many").replaceChildren();
    openMany(8, Object.fromEntries(query(MODEL_KNOBS.filter((name) => name !== "prompt"))));
  }

  // `count` EventSources at once, each on its own prompt; sseLab.many.streams says when each
  // opened, got its first token and ended. Over HTTP/1.1 the 7th waits for a free connection.
  function openMany(count, params) {
    const t0 = performance.now();
    const many = { count, ended: 0, done: false, streams: [] };
    lab.many = many;
    for (let index = 0; index < count; index++) {
      const stream = { index, createdMs: performance.now() - t0, openMs: null, firstTokenMs: null, endMs: null };
      stream.tokens = 0;
      stream.outcome = null; // done, error (an error event), failed (the connection)
      many.streams.push(stream);
      const query = new URLSearchParams({ ...params, prompt: `stream ${index}` });
      const source = new EventSource(`/api/chat/stream?${query}`);
      const end = (outcome) => {
        source.close();
        if (stream.outcome !== null) return;
        stream.outcome = outcome;
        stream.endMs = performance.now() - t0;
        many.ended += 1;
        many.done = many.ended === count;
      };
      source.addEventListener("open", () => {
        stream.openMs = performance.now() - t0;
      });
      source.addEventListener("token", () => {
        if (stream.firstTokenMs === null) stream.firstTokenMs = performance.now() - t0;
        stream.tokens += 1;
      });
      source.addEventListener("done", () => end("done"));
      source.addEventListener("error", (event) => end(event instanceof MessageEvent ? "error" : "failed"));
    }
    return count;
  }

  // The protocol the page itself came over: "http/1.1" or "h2".
  function protocol() {
    return performance.getEntriesByType("navigation")[0]?.nextHopProtocol ?? "";
  }

  const params = new URLSearchParams(location.search);
  fillForm(params);
  if (params.get("big") === "1") document.body.classList.add("big");
  $("knobs").addEventListener("submit", (event) => {
    event.preventDefault();
    startAll();
  });
  $("stop").addEventListener("click", stopAll);
  $("open-many").addEventListener("click", openManyFromForm);
  $("many-protocol").textContent = protocol() || "?";
  requestAnimationFrame(tick);
  if (params.get("autostart") === "1") startAll();
})();
