// pagedserve's built-in page: the playground (streaming chat and completions), the dashboard
// (polling /ui/state once a second) and the plugins panel (admin API calls with a token typed in
// and kept in this tab's memory only, sent only to the admin listener).
'use strict';

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// Tabs

for (const tab of document.querySelectorAll('.tab')) {
  tab.addEventListener('click', () => {
    for (const t of document.querySelectorAll('.tab')) t.classList.toggle('active', t === tab);
    for (const panel of document.querySelectorAll('.panel')) panel.classList.toggle('hidden', panel.id !== tab.dataset.tab);
    drawAll();
  });
}

// ---------------------------------------------------------------------------------------------
// Playground

let history = [];          // chat turns: {role, content}
let running = null;        // AbortController of the answer being streamed

function setMode() {
  const chat = $('mode').value === 'chat';
  for (const el of document.querySelectorAll('.chat-only')) el.classList.toggle('hidden', !chat);
  for (const el of document.querySelectorAll('.completion-only')) el.classList.toggle('hidden', chat);
  $('chat-input').placeholder = chat ? 'Write a message (Enter sends, Shift+Enter: new line)' : 'A prompt to continue';
}
$('mode').addEventListener('change', () => { setMode(); clearTranscript(); });
$('response-format').addEventListener('change', () => $('schema-label').classList.toggle('hidden', $('response-format').value !== 'json_schema'));
setMode();

function clearTranscript() {
  history = [];
  $('transcript').replaceChildren();
  $('stats').textContent = '';
}
$('clear').addEventListener('click', clearTranscript);

function addTurn(role, text) {
  const div = document.createElement('div');
  div.className = 'turn ' + role;
  const who = document.createElement('div');
  who.className = 'who';
  who.textContent = role;
  const body = document.createElement('div');
  body.className = 'body';
  body.textContent = text;
  div.append(who, body);
  $('transcript').append(div);
  $('transcript').scrollTop = $('transcript').scrollHeight;
  return body;
}

function number(id) {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
}

function requestBody(prompt) {
  const body = {
    stream: true,
    stream_options: { include_usage: true },
    temperature: number('temperature'),
    top_p: number('top-p'),
    max_tokens: number('max-tokens'),
  };
  const seed = number('seed');
  if (seed !== undefined) body.seed = seed;
  if ($('sampler').value) body.sampler = $('sampler').value;
  const format = $('response-format').value;
  if (format === 'json_object') body.response_format = { type: 'json_object' };
  if (format === 'json_schema') {
    body.response_format = { type: 'json_schema', json_schema: { name: 'answer', schema: JSON.parse($('schema').value) } };
  }
  if ($('mode').value === 'chat') {
    const messages = [];
    if ($('system').value.trim()) messages.push({ role: 'system', content: $('system').value });
    body.messages = messages.concat(history, [{ role: 'user', content: prompt }]);
  } else {
    body.prompt = prompt;
    if ($('logprobs').checked) body.logprobs = 1;
  }
  return body;
}

// Reads an SSE response, calling onData with each parsed `data:` payload until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        if (data === '[DONE]') return;
        onData(JSON.parse(data));
      }
    }
  }
}

function tokenSpan(text, logprob) {
  const span = document.createElement('span');
  span.className = 'token';
  span.textContent = text;
  const p = Math.exp(logprob);
  span.title = `log-prob ${logprob.toFixed(3)} (p = ${p.toFixed(3)})`;
  span.style.setProperty('--p', p.toFixed(3));
  return span;
}

async function send() {
  const prompt = $('chat-input').value;
  if (!prompt.trim() || running) return;
  let body;
  try {
    body = requestBody(prompt);
  } catch (e) {
    $('stats').textContent = 'The JSON schema does not parse: ' + e.message;
    return;
  }
  const chat = $('mode').value === 'chat';
  addTurn(chat ? 'user' : 'prompt', prompt);
  $('chat-input').value = '';
  const answer = addTurn(chat ? 'assistant' : 'completion', '');
  answer.classList.add('streaming');
  running = new AbortController();
  $('send').disabled = true;
  $('stop').disabled = false;
  const started = performance.now();
  let firstToken = null, text = '', usage = null, finish = null, chunks = 0;
  try {
    const response = await fetch(chat ? '/v1/chat/completions' : '/v1/completions', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(`${response.status}: ${error.error ? error.error.message : response.statusText}`);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = chat ? (choice.delta && choice.delta.content) || '' : choice.text || '';
        if (piece) {
          if (firstToken === null) firstToken = performance.now();
          chunks += 1;
          text += piece;
          const lp = choice.logprobs;
          if (!chat && lp && lp.token_logprobs && lp.tokens) {
            lp.tokens.forEach((t, i) => answer.append(tokenSpan(t, lp.token_logprobs[i] ?? 0)));
          } else {
            answer.textContent = text;
          }
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    if (chat) history.push({ role: 'user', content: prompt }, { role: 'assistant', content: text });
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const decodeSeconds = firstToken === null ? 0 : (ended - firstToken) / 1000;
    const rate = tokens > 1 && decodeSeconds > 0 ? ((tokens - 1) / decodeSeconds).toFixed(1) : '–';
    $('stats').textContent =
      `${usage ? usage.prompt_tokens : '?'} prompt + ${tokens} output tokens · ` +
      `TTFT ${firstToken === null ? '–' : Math.round(firstToken - started) + ' ms'} · ${rate} tokens/s · finish: ${finish || '–'}`;
  } catch (e) {
    $('stats').textContent = e.name === 'AbortError' ? 'stopped' : 'error: ' + e.message;
    answer.classList.add('error');
  } finally {
    answer.classList.remove('streaming');
    running = null;
    $('send').disabled = false;
    $('stop').disabled = true;
  }
}
$('send').addEventListener('click', send);
$('stop').addEventListener('click', () => running && running.abort());
$('chat-input').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); send(); }
});

// ---------------------------------------------------------------------------------------------
// Dashboard

const samples = [];        // {t, state}: the last two minutes of /ui/state
let latest = null;
let adminOrigin = null;

function percentile(bounds, counts, q) {
  // counts: per-bucket (not cumulative) counts over a window; linear inside the bucket.
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  let rank = q * total, seen = 0;
  for (let i = 0; i < counts.length; i++) {
    if (seen + counts[i] >= rank) {
      const lo = i === 0 ? 0 : bounds[i - 1];
      const hi = bounds[i] === null ? lo : bounds[i];
      return lo + (hi - lo) * ((rank - seen) / Math.max(counts[i], 1));
    }
    seen += counts[i];
  }
  return bounds[bounds.length - 2];
}

function windowCounts(now, before, key) {
  const a = now.state[key].cumulative, b = before ? before.state[key].cumulative : a.map(() => 0);
  const cumulative = a.map((v, i) => v - b[i]);
  return cumulative.map((v, i) => v - (i ? cumulative[i - 1] : 0));
}

function sampleAgo(seconds) {
  const target = performance.now() - seconds * 1000;
  let best = samples[0];
  for (const s of samples) if (s.t <= target) best = s;
  return best;
}

function rate(now, before, counter) {
  if (!before || now === before) return 0;
  return (now.state.counters[counter] - before.state.counters[counter]) / ((now.t - before.t) / 1000);
}

const colors = { free: '#d9dee7', used: '#3b6fd4', cached: '#5fb87a' };

function drawBlocks(engine) {
  const canvas = $('blocks');
  const ctx = canvas.getContext('2d');
  const n = engine.cells.length;
  const width = canvas.clientWidth || canvas.width;
  canvas.width = width;
  const cell = Math.max(2, Math.floor(Math.sqrt((width * 160) / Math.max(n, 1))));
  const perRow = Math.max(1, Math.floor(width / cell));
  canvas.height = Math.ceil(n / perRow) * cell;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const palette = [colors.free, colors.used, colors.cached];
  for (let i = 0; i < n; i++) {
    ctx.fillStyle = palette[engine.cells[i]] || '#000';
    ctx.fillRect((i % perRow) * cell, Math.floor(i / perRow) * cell, cell - (cell > 3 ? 1 : 0), cell - (cell > 3 ? 1 : 0));
  }
  const per = engine.blocks_per_cell > 1 ? ` (a cell: ${engine.blocks_per_cell} blocks)` : '';
  $('block-counts').textContent =
    `${engine.num_blocks} blocks of ${engine.block_size} tokens: ${engine.used} used, ${engine.cached} prefix-cached, ${engine.free} free${per}`;
}

function drawSeries(canvas, series, colorsList, unit) {
  const ctx = canvas.getContext('2d');
  canvas.width = canvas.clientWidth || canvas.width;
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1e-9, ...series.flatMap((s) => s.filter((v) => v !== null)));
  ctx.fillStyle = '#667';
  ctx.font = '11px sans-serif';
  ctx.fillText(`${max.toFixed(max < 10 ? 1 : 0)} ${unit}`, 4, 12);
  series.forEach((s, k) => {
    ctx.strokeStyle = colorsList[k];
    ctx.lineWidth = 2;
    ctx.beginPath();
    let drawn = false;
    s.forEach((v, i) => {
      if (v === null) return;
      const x = (i / Math.max(s.length - 1, 1)) * (w - 8) + 4;
      const y = h - 4 - (v / max) * (h - 20);
      if (drawn) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      drawn = true;
    });
    ctx.stroke();
  });
}

function drawAll() {
  if (!latest) return;
  drawBlocks(latest.state.engine);
  const throughput = [], ttft = [], tpot = [];
  for (let i = 1; i < samples.length; i++) {
    throughput.push(rate(samples[i], samples[i - 1], 'generation_tokens'));
  }
  for (let i = 0; i < samples.length; i += 1) {
    const before = samples.find((s) => s.t >= samples[i].t - 30000);
    const ft = windowCounts(samples[i], before, 'time_to_first_token');
    const pt = windowCounts(samples[i], before, 'time_per_output_token');
    const bt = samples[i].state.time_to_first_token.bounds, bp = samples[i].state.time_per_output_token.bounds;
    const p = (b, c) => { const v = percentile(b, c, 0.5); return v === null ? null : v * 1000; };
    ttft.push(p(bt, ft));
    tpot.push(p(bp, pt));
  }
  drawSeries($('throughput-chart'), [throughput], ['#3b6fd4'], 'tok/s');
  drawSeries($('latency-chart'), [ttft, tpot], ['#d4713b', '#3b6fd4'], 'ms');
}

function renderDashboard() {
  const s = latest.state;
  $('running').textContent = s.engine.running;
  $('waiting').textContent = s.engine.waiting;
  $('policy').textContent = s.engine.policy;
  $('gen-tokens').textContent = s.counters.generation_tokens;
  $('preemptions').textContent = s.counters.preemptions;
  const c = s.counters;
  $('prefix-hits').textContent = c.prefix_cache_queries ? `${((100 * c.prefix_cache_hits) / c.prefix_cache_queries).toFixed(1)} %` : '–';
  $('tokens-per-second').textContent = rate(latest, sampleAgo(5), 'generation_tokens').toFixed(1);
  const before = sampleAgo(30);
  const rows = [];
  for (const [label, key] of [['TTFT', 'time_to_first_token'], ['TPOT', 'time_per_output_token']]) {
    const counts = windowCounts(latest, before === latest ? null : before, key);
    const bounds = s[key].bounds;
    const ps = [0.5, 0.9, 0.99].map((q) => percentile(bounds, counts, q));
    rows.push(`${label} p50 ${fmtMs(ps[0])} · p90 ${fmtMs(ps[1])} · p99 ${fmtMs(ps[2])}`);
  }
  $('latency-table').textContent = rows.join('   |   ');
  if (!$('dashboard').classList.contains('hidden')) drawAll();
}

function fmtMs(v) {
  return v === null ? '–' : `${(v * 1000).toFixed(v < 0.01 ? 2 : 0)} ms`;
}

// ---------------------------------------------------------------------------------------------
// Plugins

function renderPlugins() {
  const s = latest.state;
  const tbody = document.querySelector('#plugins-table tbody');
  const rows = s.plugins.map((p) => {
    const tr = document.createElement('tr');
    tr.dataset.kind = p.kind;
    tr.dataset.name = p.name;
    const versions = document.createElement('div');
    for (const v of p.versions) {
      const item = document.createElement('div');
      item.className = v.active ? 'version active' : 'version';
      item.textContent = `v${v.version} ${v.sha256.slice(0, 12)}${v.disabled ? ' (disabled)' : ''}`;
      item.title = v.sha256;
      if (!v.active && adminOrigin) {
        const b = document.createElement('button');
        b.textContent = 'activate';
        b.className = 'small activate';
        b.addEventListener('click', () => adminCall('POST', `/admin/plugins/${p.kind}/${p.name}/activate?version=${v.version}`));
        item.append(' ', b);
      }
      versions.append(item);
    }
    const cells = [p.kind, p.name, p.active_version === null ? '–' : `v${p.active_version}${p.in_use ? ' (in use)' : ''}`, versions,
      String(p.calls), p.calls ? `${((1000 * p.call_seconds) / p.calls).toFixed(3)} ms` : '–', String(p.faults)];
    for (const c of cells) {
      const td = document.createElement('td');
      if (typeof c === 'string') td.textContent = c; else td.append(c);
      tr.append(td);
    }
    const actions = document.createElement('td');
    if (adminOrigin && p.active_version !== null) {
      const b = document.createElement('button');
      b.textContent = 'roll back';
      b.className = 'small rollback';
      b.addEventListener('click', () => adminCall('POST', `/admin/plugins/${p.kind}/${p.name}/rollback`));
      actions.append(b);
    }
    tr.append(actions);
    return tr;
  });
  tbody.replaceChildren(...rows);
  const samplers = s.plugins.filter((p) => p.kind === 'sampler' && p.active_version !== null).map((p) => p.name);
  const select = $('sampler');
  const have = [...select.options].map((o) => o.value).slice(1);
  if (have.join() !== samplers.join()) {
    const chosen = select.value;
    select.replaceChildren(new Option('native', ''), ...samplers.map((n) => new Option(n, n)));
    select.value = samplers.includes(chosen) ? chosen : '';
  }
}

let adminToken = '';        // in memory only: never stored, never sent to the API listener
$('admin-token').addEventListener('input', (e) => { adminToken = e.target.value; });

async function adminCall(method, path, body, headers) {
  if (!adminOrigin) return;
  $('admin-status').textContent = `${method} ${path} …`;
  try {
    const response = await fetch(adminOrigin + path, {
      method, body, headers: Object.assign({ Authorization: 'Bearer ' + adminToken }, headers || {}), credentials: 'omit',
    });
    const answer = await response.json().catch(() => ({}));
    $('admin-status').textContent = response.ok
      ? `${method} ${path}: ${response.status} ${answer.version ? 'version ' + answer.version.version + ' active' : 'done'}`
      : `${method} ${path}: ${response.status} ${answer.error ? answer.error.message : ''}`;
  } catch (e) {
    $('admin-status').textContent = `${method} ${path}: ${e.message}`;
  }
  poll();
}

$('upload-button').addEventListener('click', async () => {
  const file = $('upload-file').files[0];
  const name = $('upload-name').value.trim();
  if (!file || !name) { $('admin-status').textContent = 'choose a component file and a name'; return; }
  const bytes = await file.arrayBuffer();
  const digest = await crypto.subtle.digest('SHA-256', bytes);
  const sha = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
  const headers = { 'x-sha256': sha, 'Content-Type': 'application/wasm' };
  if ($('upload-config').value.trim()) headers['x-plugin-config'] = $('upload-config').value.trim();
  adminCall('PUT', `/admin/plugins/${$('upload-kind').value}/${encodeURIComponent(name)}`, bytes, headers);
});

// ---------------------------------------------------------------------------------------------
// Polling

let polling = false;         // one poll at a time: a slow answer is not stacked with the next

async function poll() {
  if (polling) return;
  polling = true;
  try {
    const [state, health] = await Promise.all([
      fetch('/ui/state').then((r) => { if (!r.ok) throw new Error(`/ui/state: ${r.status}`); return r.json(); }),
      fetch('/health'),
    ]);
    $('health').textContent = health.ok ? 'healthy' : 'unhealthy';
    $('health').className = health.ok ? 'pill ok' : 'pill bad';
    latest = { t: performance.now(), state };
    samples.push(latest);
    while (samples.length && samples[0].t < latest.t - 120000) samples.shift();
    $('model').textContent = `${state.model} · context ${state.max_model_len}`;
    adminOrigin = state.admin;
    $('admin').classList.toggle('hidden', !adminOrigin);
    $('admin-off').classList.toggle('hidden', !!adminOrigin);
    renderDashboard();
    renderPlugins();
  } catch (e) {
    $('health').textContent = 'unreachable';
    $('health').className = 'pill bad';
  } finally {
    polling = false;
  }
}

poll();
setInterval(poll, 1000);
