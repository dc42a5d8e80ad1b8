// The official Node SDK with a function tool, through the proxy: chat completions (a call,
// then the answer streamed with usage) and the Responses API (a call chained by
// previous_response_id). Prints one JSON line for tests/test_js_clients.py.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.PROXY_URL, apiKey: process.env.PROXY_KEY, maxRetries: 0 });
const parameters = {
  type: "object",
  properties: { city: { type: "string" } },
  required: ["city"],
  additionalProperties: false,
};
const getWeather = ({ city }) => `Sunny and 21 C in ${city}`;

const messages = [{ role: "user", content: "What is the weather in Paris?" }];
const tools = [{ type: "function", function: { name: "get_weather", parameters, strict: true } }];
const first = await client.chat.completions.create({ model: "gpt-4o-mini", messages, tools });
const call = first.choices[0].message.tool_calls[0];
messages.push(first.choices[0].message);
messages.push({ role: "tool", tool_call_id: call.id, content: getWeather(JSON.parse(call.function.arguments)) });
const stream = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages,
  tools,
  stream: true,
  stream_options: { include_usage: true },
});
let chatText = "";
let streamedUsage = null;
for await (const chunk of stream) {
  chatText += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) streamedUsage = chunk.usage;
}

const responseTools = [{ type: "function", name: "get_weather", parameters, strict: true }];
const asked = await client.responses.create({ model: "gpt-4o-mini", input: "Weather in Oslo?", tools: responseTools });
const fc = asked.output.find((item) => item.type === "function_call");
const answered = await client.responses.create({
  model: "gpt-4o-mini",
  previous_response_id: asked.id,
  input: [{ type: "function_call_output", call_id: fc.call_id, output: getWeather(JSON.parse(fc.arguments)) }],
  tools: responseTools,
});

console.log(
  JSON.stringify({
    finish: first.choices[0].finish_reason,
    chatText,
    usage: [first.usage, streamedUsage].map((u) => [u.prompt_tokens, u.completion_tokens]),
    responsesText: answered.output_text,
    responsesUsage: [asked.usage, answered.usage].map((u) => [u.input_tokens, u.output_tokens]),
  }),
);
