// The official Node `openai` SDK, the Vercel AI SDK's OpenAI-compatible provider (chat) and its
// OpenAI provider (whose default model speaks the Responses API) against a
// live `ferrolm serve` (FERROLM_BASE, no keys). Started by crates/cli/tests/sdk.rs; the packages
// are installed (pinned) by .ci/run into target/sdk-node. Exits non-zero if any check fails.
import assert from "node:assert/strict";

import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import OpenAI from "openai";
import { z } from "zod";

const BASE = process.env.FERROLM_BASE;
const MODEL = "smollm2-135m-instruct";
const PARIS = "What is the capital of France?";
// The golden tests' system prompt: with SmolLM2's default one the first token is a near-tie.
const SYSTEM = "You are a helpful assistant.";
const PARIS_MSGS = [
  { role: "system", content: SYSTEM },
  { role: "user", content: PARIS },
];

const checks = {
  async openaiNode() {
    const client = new OpenAI({ baseURL: `${BASE}/v1`, apiKey: "not-needed", maxRetries: 0 });
    const r = await client.chat.completions.create({
      model: MODEL,
      messages: PARIS_MSGS,
      temperature: 0,
      max_tokens: 24,
    });
    const text = r.choices[0].message.content;
    assert.match(text, /Paris/);
    const stream = await client.chat.completions.create({
      model: MODEL,
      messages: PARIS_MSGS,
      temperature: 0,
      max_tokens: 24,
      stream: true,
      stream_options: { include_usage: true },
    });
    let streamed = "";
    let usage = null;
    for await (const c of stream) {
      streamed += c.choices[0]?.delta?.content ?? "";
      usage = c.usage ?? usage;
    }
    assert.equal(streamed, text);
    assert.equal(usage.completion_tokens, r.usage.completion_tokens);
  },

  // `@ai-sdk/openai`'s default model speaks the Responses API (/v1/responses), as an agent loop
  // on the AI SDK does.
  async vercelAiSdkResponses() {
    // Keep what the SDK sends, to see the items of the loop's second step.
    const bodies = [];
    const openai = createOpenAI({
      baseURL: `${BASE}/v1`,
      apiKey: "not-needed",
      fetch: async (url, init) => {
        bodies.push(JSON.parse(init.body));
        return fetch(url, init);
      },
    });
    const model = openai(MODEL);
    const { text, response } = await generateText({ model, system: SYSTEM, prompt: PARIS, temperature: 0, maxOutputTokens: 24 });
    assert.match(text, /Paris/);
    assert.match(response.id, /^resp_/);
    const s = streamText({ model, system: SYSTEM, prompt: PARIS, temperature: 0, maxOutputTokens: 24 });
    let streamed = "";
    for await (const t of s.textStream) streamed += t;
    assert.equal(streamed, text);
    assert.ok((await s.usage).outputTokens > 0);
    // A second turn: with `store` on, the SDK sends the first answer back as an item_reference
    // to the stored output item, which the server resolves.
    const first = await generateText({ model, system: SYSTEM, prompt: PARIS, temperature: 0, maxOutputTokens: 16 });
    const second = await generateText({
      model,
      system: SYSTEM,
      messages: [{ role: "user", content: PARIS }, ...first.response.messages, { role: "user", content: "And of Italy?" }],
      temperature: 0,
      maxOutputTokens: 16,
    });
    assert.ok(bodies.at(-1).input.some((i) => i.type === "item_reference"), JSON.stringify(bodies.at(-1).input));
    assert.ok(second.text.length > 0);
    assert.ok(second.usage.inputTokens > first.usage.inputTokens + first.usage.outputTokens - 4);
    // A tool loop of two steps: the model calls the tool, the SDK runs it and sends its result
    // back (function_call + function_call_output items), the model answers.
    let ran = 0;
    const loop = await generateText({
      model,
      prompt: "What is the weather in Paris?",
      temperature: 0,
      maxOutputTokens: 100,
      tools: {
        getWeather: tool({
          description: "The current weather in a city",
          inputSchema: z.object({ city: z.string().max(40) }),
          execute: async ({ city }) => {
            ran += 1;
            return { city, weather: "sunny", celsius: 24 };
          },
        }),
      },
      // The first step must call the tool; the second must answer in words.
      prepareStep: ({ stepNumber }) =>
        stepNumber === 0 ? { toolChoice: { type: "tool", toolName: "getWeather" } } : { toolChoice: "none" },
      stopWhen: stepCountIs(2),
    });
    assert.equal(loop.steps.length, 2);
    assert.equal(ran, 1);
    assert.equal(loop.steps[0].toolCalls[0].toolName, "getWeather");
    assert.equal(loop.steps[0].toolResults[0].output.weather, "sunny");
    assert.ok(loop.steps[1].text.length > 0, "the second step answered nothing");
    // The second step sent the call and its result as items, and the prompt held them.
    const sent = bodies.at(-1);
    const kinds = sent.input.map((i) => i.type ?? "message");
    assert.ok(kinds.includes("function_call") && kinds.includes("function_call_output"), JSON.stringify(sent.input));
    const plain = await generateText({ model, prompt: "What is the weather in Paris?", temperature: 0, maxOutputTokens: 1 });
    assert.ok(loop.steps[1].usage.inputTokens > plain.usage.inputTokens + 20);
    // The same loop streamed: the call arrives through the function-call argument events.
    const streamedLoop = streamText({
      model,
      prompt: "What is the weather in Paris?",
      temperature: 0,
      maxOutputTokens: 100,
      tools: {
        getWeather: tool({
          description: "The current weather in a city",
          inputSchema: z.object({ city: z.string().max(40) }),
          execute: async ({ city }) => ({ city, weather: "sunny", celsius: 24 }),
        }),
      },
      prepareStep: ({ stepNumber }) =>
        stepNumber === 0 ? { toolChoice: { type: "tool", toolName: "getWeather" } } : { toolChoice: "none" },
      stopWhen: stepCountIs(2),
    });
    const parts = [];
    for await (const p of streamedLoop.fullStream) parts.push(p.type);
    assert.ok(parts.includes("tool-call") && parts.includes("tool-result") && parts.includes("text-delta"), parts.join(","));
    const steps = await streamedLoop.steps;
    assert.equal(steps.length, 2);
    assert.equal(steps[0].toolCalls[0].toolName, "getWeather");
    assert.equal(typeof steps[0].toolCalls[0].input.city, "string");
    // Not compared with the unstreamed loop's text: this prompt's greedy reply differs between
    // a cold prefill and one served from the prefix cache (the engine's numerics, not the API).
    assert.ok(steps[1].text.length > 0, "the streamed second step answered nothing");
  },

  async vercelAiSdk() {
    const ferrolm = createOpenAICompatible({
      name: "ferrolm",
      baseURL: `${BASE}/v1`,
      supportsStructuredOutputs: true,
    });
    const model = ferrolm.chatModel(MODEL);
    const { text } = await generateText({ model, system: SYSTEM, prompt: PARIS, temperature: 0, maxOutputTokens: 24 });
    assert.match(text, /Paris/);
    const s = streamText({ model, system: SYSTEM, prompt: PARIS, temperature: 0, maxOutputTokens: 24 });
    let streamed = "";
    for await (const t of s.textStream) streamed += t;
    assert.equal(streamed, text);
    const { object } = await generateObject({
      model,
      schema: z.object({ city: z.string().max(40), country: z.string().max(40) }),
      prompt: "Which city is the capital of France? Answer as JSON.",
      temperature: 0,
      maxOutputTokens: 200,
    });
    assert.equal(typeof object.city, "string");
    const called = await generateText({
      model,
      prompt: "What is the weather in Paris?",
      temperature: 0,
      maxOutputTokens: 100,
      tools: {
        getWeather: tool({
          description: "The current weather in a city",
          inputSchema: z.object({ city: z.string().max(40) }),
        }),
      },
      toolChoice: { type: "tool", toolName: "getWeather" },
    });
    assert.equal(called.toolCalls[0].toolName, "getWeather");
    assert.equal(typeof called.toolCalls[0].input.city, "string");
  },
};

let failed = 0;
for (const [name, fn] of Object.entries(checks)) {
  const t0 = Date.now();
  try {
    await fn();
    console.log(`ok    ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL  ${name}\n${e.stack ?? e}`);
  }
}
console.log(failed ? `${failed} failed` : "all checks passed");
process.exit(failed ? 1 : 0);
