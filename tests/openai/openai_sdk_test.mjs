// moed's HTTP API driven by the official OpenAI SDK, as a user of vLLM or llama-server would
// drive it: the SDK's baseURL points at a real daemon on loopback.
//   MOED_BINARY, MOECTL_BINARY, MOED_SYNTH_BINARY: the binaries under test.
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';

const work = mkdtempSync(join(tmpdir(), 'moed-openai-'));
const modelDir = join(work, 'tiny-chat');
const daemons = [];

// Starts moed on free ports; resolves with its gRPC and HTTP addresses.
function startDaemon(extra = [], model = modelDir) {
  const child = spawn(process.env.MOED_BINARY,
                      ['--model', model, '--listen', '127.0.0.1:0', '--http-listen', '127.0.0.1:0',
                       '--log-level', 'warn', ...extra],
                      { stdio: ['ignore', 'pipe', 'inherit'] });
  daemons.push(child);
  const lines = createInterface({ input: child.stdout });
  return new Promise((resolve, reject) => {
    const seen = {};
    const timer = setTimeout(() => reject(new Error('moed did not start within 30 s')), 30000);
    child.on('exit', (code) => reject(new Error(`moed exited with ${code}`)));
    lines.on('line', (line) => {
      if (line.startsWith('listening on ')) seen.grpc = line.slice('listening on '.length);
      if (line.startsWith('http listening on ')) {
        seen.http = line.slice('http listening on '.length);
        clearTimeout(timer);
        resolve(seen);
      }
    });
  });
}

function requestsRunning(grpcAddress) {
  const info = JSON.parse(execFileSync(process.env.MOECTL_BINARY,
                                       ['--server', grpcAddress, '--json', 'info']).toString());
  return Number(info.requests_running);
}

let daemon;
let client;

before(async () => {
  execFileSync(process.env.MOED_SYNTH_BINARY,
               ['--arch', 'mixtral', '--preset', 'tiny', '--out', modelDir], { stdio: 'ignore' });
  daemon = await startDaemon();
  client = new OpenAI({ baseURL: `http://${daemon.http}/v1`, apiKey: 'unused', maxRetries: 0 });
});

after(() => {
  for (const child of daemons) child.kill('SIGTERM');
  rmSync(work, { recursive: true, force: true });
});

test('models.list names the served model', async () => {
  const models = [];
  for await (const model of client.models.list()) models.push(model);
  assert.deepEqual(models.map((m) => m.id), ['tiny-chat']);
  assert.equal(models[0].object, 'model');
  const one = await client.models.retrieve('tiny-chat');
  assert.equal(one.id, 'tiny-chat');
});

test('completions: text, finish reason and usage', async () => {
  const out = await client.completions.create({
    model: 'tiny-chat', prompt: 'The clockmaker', max_tokens: 6, temperature: 0 });
  assert.equal(out.object, 'text_completion');
  assert.equal(out.choices.length, 1);
  assert.equal(typeof out.choices[0].text, 'string');
  assert.equal(out.choices[0].finish_reason, 'length');
  assert.equal(out.usage.completion_tokens, 6);
  assert.ok(out.usage.prompt_tokens > 0);
  assert.equal(out.usage.total_tokens, out.usage.prompt_tokens + 6);
});

test('chat completions: streamed deltas add up to the unstreamed answer, usage last', async () => {
  const request = { model: 'tiny-chat', messages: [{ role: 'user', content: 'Hello there' }],
                    max_tokens: 8, temperature: 0, ignore_eos: true };
  const whole = await client.chat.completions.create(request);
  assert.equal(whole.object, 'chat.completion');
  assert.equal(whole.choices[0].message.role, 'assistant');
  assert.equal(whole.choices[0].finish_reason, 'length');
  assert.equal(whole.usage.completion_tokens, 8);

  const stream = await client.chat.completions.create({
    ...request, stream: true, stream_options: { include_usage: true } });
  let text = '';
  let usage = null;
  let finish = null;
  let role = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) {
      assert.deepEqual(chunk.choices, []);
      usage = chunk.usage;
      continue;
    }
    const delta = chunk.choices[0].delta;
    if (delta.role) role = delta.role;
    if (delta.content) text += delta.content;
    if (chunk.choices[0].finish_reason) finish = chunk.choices[0].finish_reason;
  }
  assert.equal(role, 'assistant');
  assert.equal(text, whole.choices[0].message.content);
  assert.equal(finish, 'length');
  assert.deepEqual(usage, whole.usage);
});

test('n=2 gives two choices, each sampled with its own seed', async () => {
  const out = await client.completions.create({
    model: 'tiny-chat', prompt: 'The river', max_tokens: 5, n: 2, seed: 11, temperature: 1 });
  assert.deepEqual(out.choices.map((c) => c.index), [0, 1]);
  assert.equal(out.usage.completion_tokens, 10);
  // Choice 1 samples with seed + 1: the same as a lone request with seed 12.
  const lone = await client.completions.create({
    model: 'tiny-chat', prompt: 'The river', max_tokens: 5, seed: 12, temperature: 1 });
  assert.equal(out.choices[1].text, lone.choices[0].text);
});

test('a stop string ends the text before it', async () => {
  const free = await client.completions.create({
    model: 'tiny-chat', prompt: 'The clockmaker', max_tokens: 12, temperature: 0, ignore_eos: true });
  const text = free.choices[0].text;
  const stop = text.slice(4, 6);
  const at = text.indexOf(stop);
  assert.ok(stop.length === 2 && at >= 0, `greedy text too short: ${JSON.stringify(text)}`);
  const stopped = await client.completions.create({
    model: 'tiny-chat', prompt: 'The clockmaker', max_tokens: 12, temperature: 0, ignore_eos: true, stop: [stop] });
  assert.equal(stopped.choices[0].text, text.slice(0, at));
  assert.equal(stopped.choices[0].finish_reason, 'stop');
});

test('the same seed gives the same tokens', async () => {
  const ask = () => client.completions.create({
    model: 'tiny-chat', prompt: 'Seeded', max_tokens: 10, temperature: 0.9, seed: 1234, ignore_eos: true });
  const [a, b] = await Promise.all([ask(), ask()]);
  assert.equal(a.choices[0].text, b.choices[0].text);
});

test('logprobs come in the shape of each API; echo puts the prompt first', async () => {
  const out = await client.completions.create({
    model: 'tiny-chat', prompt: 'The clockmaker', max_tokens: 4, temperature: 0, logprobs: 2, ignore_eos: true });
  const lp = out.choices[0].logprobs;
  assert.equal(lp.tokens.length, 4);
  assert.equal(lp.token_logprobs.length, 4);
  assert.ok(lp.token_logprobs.every((x) => x <= 0));
  assert.ok(lp.top_logprobs.every((top) => Object.keys(top).length <= 2));
  assert.deepEqual(lp.text_offset, [...lp.text_offset].sort((a, b) => a - b));
  // Greedy: the chosen token is the most likely one.
  lp.top_logprobs.forEach((top, i) => assert.equal(Math.max(...Object.values(top)), lp.token_logprobs[i]));

  const chat = await client.chat.completions.create({
    model: 'tiny-chat', messages: [{ role: 'user', content: 'hi' }], max_tokens: 3, ignore_eos: true,
    logprobs: true, top_logprobs: 2 });
  const content = chat.choices[0].logprobs.content;
  assert.equal(content.length, 3);
  for (const entry of content) {
    assert.equal(typeof entry.token, 'string');
    assert.ok(entry.logprob <= 0);
    assert.deepEqual(entry.bytes, [...Buffer.from(entry.token, 'utf8')]);
    assert.ok(entry.top_logprobs.length <= 2);
  }

  const echoed = await client.completions.create({
    model: 'tiny-chat', prompt: 'The clockmaker', max_tokens: 3, temperature: 0, echo: true });
  const plain = await client.completions.create({
    model: 'tiny-chat', prompt: 'The clockmaker', max_tokens: 3, temperature: 0 });
  assert.equal(echoed.choices[0].text, 'The clockmaker' + plain.choices[0].text);
});

test('a bad request is a 400 with OpenAI error JSON', async () => {
  await assert.rejects(
    client.completions.create({ model: 'tiny-chat', prompt: 'x', temperature: 5 }),
    (error) => {
      assert.ok(error instanceof OpenAI.BadRequestError);
      assert.equal(error.status, 400);
      assert.equal(error.error.type, 'invalid_request_error');
      assert.equal(error.error.param, 'temperature');
      assert.match(error.error.message, /temperature/);
      return true;
    });
  await assert.rejects(
    client.chat.completions.create({ model: 'other-model', messages: [{ role: 'user', content: 'x' }] }),
    (error) => error.status === 404 && error.error.code === 'model_not_found');
});

test('health, unknown routes and wrong methods', async () => {
  const base = `http://${daemon.http}`;
  const health = await fetch(`${base}/health`);
  assert.equal(health.status, 200);
  assert.deepEqual(await health.json(), { status: 'ok' });
  const missing = await fetch(`${base}/v1/embeddings`, { method: 'POST', body: '{}' });
  assert.equal(missing.status, 404);
  assert.equal((await missing.json()).error.code, 'not_found');
  const wrong = await fetch(`${base}/v1/models`, { method: 'DELETE' });
  assert.equal(wrong.status, 405);
  const malformed = await fetch(`${base}/v1/completions`, { method: 'POST', body: '{"model": ' });
  assert.equal(malformed.status, 400);
  assert.match((await malformed.json()).error.message, /not valid JSON/);
});

test('an API key is required when the daemon has one', async () => {
  const guarded = await startDaemon(['--api-key', 'sesame']);
  const wrong = new OpenAI({ baseURL: `http://${guarded.http}/v1`, apiKey: 'open-up', maxRetries: 0 });
  await assert.rejects(wrong.models.list(), (error) => error.status === 401);
  const right = new OpenAI({ baseURL: `http://${guarded.http}/v1`, apiKey: 'sesame', maxRetries: 0 });
  const out = await right.completions.create(
    { model: 'tiny-chat', prompt: 'hi', max_tokens: 2, ignore_eos: true });
  assert.equal(out.usage.completion_tokens, 2);
});

// The demo preset: a context long enough for a stream still running when something happens.
let demoDir = null;
function demoModel() {
  if (demoDir === null) {
    demoDir = join(work, 'demo');
    execFileSync(process.env.MOED_SYNTH_BINARY,
                 ['--arch', 'mixtral', '--preset', 'demo', '--out', demoDir], { stdio: 'ignore' });
  }
  return demoDir;
}

test('a client that disconnects mid-stream frees its slot', async () => {
  const demo = await startDaemon([], demoModel());
  const demoClient = new OpenAI({ baseURL: `http://${demo.http}/v1`, apiKey: 'unused', maxRetries: 0 });
  const controller = new AbortController();
  const stream = await demoClient.chat.completions.create(
    { model: 'demo', messages: [{ role: 'user', content: 'Tell me everything' }],
      max_tokens: 4000, ignore_eos: true, stream: true },
    { signal: controller.signal });
  let chunks = 0;
  try {
    for await (const chunk of stream) {
      if (++chunks === 3) {
        assert.equal(requestsRunning(demo.grpc), 1);
        controller.abort();  // the SDK closes the connection; the loop ends or throws
      }
    }
  } catch (error) {
    assert.equal(error.name, 'APIUserAbortError');
  }
  assert.ok(chunks >= 3 && chunks < 1000, `the stream was not cut short: ${chunks} chunks`);
  // The scheduler frees the slot at its next step: wait for it, with a deadline.
  const deadline = Date.now() + 10000;
  while (requestsRunning(demo.grpc) !== 0 && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.equal(requestsRunning(demo.grpc), 0);
});

test('while draining, /ready is 503 and new requests get 503, and running streams go on', async () => {
  const demo = await startDaemon(['--drain-seconds', '60'], demoModel());
  const base = `http://${demo.http}`;
  const demoClient = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
  assert.equal((await fetch(`${base}/ready`)).status, 200);
  const controller = new AbortController();
  const stream = await demoClient.completions.create(
    { model: 'demo', prompt: 'A long story', max_tokens: 4000, ignore_eos: true, stream: true },
    { signal: controller.signal });
  const iterator = stream[Symbol.asyncIterator]();
  await iterator.next();  // running
  daemons.at(-1).kill('SIGTERM');
  const deadline = Date.now() + 10000;
  while ((await fetch(`${base}/ready`)).status !== 503 && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  assert.equal((await fetch(`${base}/ready`)).status, 503);
  await assert.rejects(demoClient.completions.create({ model: 'demo', prompt: 'late', max_tokens: 2 }),
                       (error) => error.status === 503);
  for (let i = 0; i < 5; ++i) {  // the stream is still being served
    const next = await iterator.next();
    assert.equal(next.done, false);
    assert.equal(next.value.choices[0].finish_reason, null);
  }
  controller.abort();  // leaving ends the drain: the daemon exits
});

// The demo model with a 64K context: a completion to its end runs far longer than a short drain.
let longDir = null;
function longModel() {
  if (longDir === null) {
    longDir = join(work, 'long');
    execFileSync(process.env.MOED_SYNTH_BINARY,
                 ['--arch', 'mixtral', '--preset', 'demo', '--max-position', '65536', '--out', longDir],
                 { stdio: 'ignore' });
  }
  return longDir;
}

test('when the drain time is up, a running stream ends with finish_reason "abort" and its usage', async () => {
  const long = await startDaemon(['--drain-seconds', '1'], longModel());
  const child = daemons.at(-1);
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  const longClient = new OpenAI({ baseURL: `http://${long.http}/v1`, apiKey: 'unused', maxRetries: 0 });
  const stream = await longClient.completions.create(
    { model: 'long', prompt: 'A very long story', max_tokens: 60000, ignore_eos: true, stream: true,
      stream_options: { include_usage: true } });
  const iterator = stream[Symbol.asyncIterator]();
  await iterator.next();  // running
  child.kill('SIGTERM');
  let finish = null;
  let usage = null;
  for (let next = await iterator.next(); !next.done; next = await iterator.next()) {
    if (next.value.choices.length > 0 && next.value.choices[0].finish_reason !== null) {
      finish = next.value.choices[0].finish_reason;
    }
    if (next.value.usage) usage = next.value.usage;
  }
  assert.equal(finish, 'abort');
  assert.ok(usage.completion_tokens > 0 && usage.completion_tokens < 60000, JSON.stringify(usage));
  assert.ok(usage.prompt_tokens > 0);
  assert.equal(await exited, 0);
});

test('a full queue answers 429', async () => {
  const busy = await startDaemon(['--max-batch', '1', '--max-queue', '0'], demoModel());
  const busyClient = new OpenAI({ baseURL: `http://${busy.http}/v1`, apiKey: 'unused', maxRetries: 0 });
  const controller = new AbortController();
  const stream = await busyClient.completions.create(
    { model: 'demo', prompt: 'occupied', max_tokens: 4000, ignore_eos: true, stream: true },
    { signal: controller.signal });
  const iterator = stream[Symbol.asyncIterator]();
  await iterator.next();  // the one slot is taken
  await assert.rejects(busyClient.completions.create({ model: 'demo', prompt: 'more', max_tokens: 2 }),
                       (error) => error.status === 429 && error.error.type === 'rate_limit_error');
  controller.abort();
});
