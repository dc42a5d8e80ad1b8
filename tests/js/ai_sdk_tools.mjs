// Vercel's AI SDK with a tool, through the proxy: generateText on the Responses API (the
// provider's default) and streamText on chat completions, each running the tool and then
// answering. Prints one JSON line for tests/test_js_clients.py.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const provider = createOpenAI({ baseURL: process.env.PROXY_URL, apiKey: process.env.PROXY_KEY });
const tools = {
  get_weather: tool({
    description: "The weather in a city",
    inputSchema: z.object({ city: z.string() }),
    execute: async ({ city }) => `Sunny and 21 C in ${city}`,
  }),
};

const generated = await generateText({
  model: provider("gpt-4o-mini"),
  prompt: "What is the weather in Paris?",
  tools,
  stopWhen: stepCountIs(3),
  maxRetries: 0,
});
const streamed = streamText({
  model: provider.chat("gpt-4o-mini"),
  prompt: "What is the weather in Oslo?",
  tools,
  stopWhen: stepCountIs(3),
  maxRetries: 0,
});
let streamedText = "";
for await (const delta of streamed.textStream) streamedText += delta;
const steps = await streamed.steps;

const usage = (step) => [step.usage.inputTokens, step.usage.outputTokens];
console.log(
  JSON.stringify({
    generatedText: generated.text,
    generatedSteps: generated.steps.map((s) => s.finishReason),
    generatedUsage: generated.steps.map(usage),
    streamedText,
    streamedSteps: steps.map((s) => s.finishReason),
    streamedUsage: steps.map(usage),
  }),
);
