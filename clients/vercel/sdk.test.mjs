// The Vercel AI SDK (ai 6, @ai-sdk/openai 3) against the gateway, as its
// users call it. vercel_test.go starts the gateway (the real Caddy, a fake
// image service that answers a PNG of the size it was asked for) and runs
// `node --test` here with its base URL in ZIMAGE_BASE_URL. Each test
// asserts what the SDK hands its caller.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createOpenAI } from '@ai-sdk/openai';
import { generateImage, generateText, streamText } from 'ai';

const baseURL = process.env.ZIMAGE_BASE_URL;
if (!baseURL) {
  throw new Error('ZIMAGE_BASE_URL is not set: run these tests through go test -run TestVercelAISDK');
}
const openai = createOpenAI({ baseURL, apiKey: process.env.ZIMAGE_API_KEY });

// pngSize reads a PNG's width and height from its IHDR chunk, after
// checking the signature.
function pngSize(bytes) {
  const sig = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  assert.deepEqual([...bytes.subarray(0, 8)], sig, 'not a PNG');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return `${view.getUint32(16)}x${view.getUint32(20)}`;
}

// The PNG the edit starts from, made by the Go test (40×30).
const sourcePNG = Buffer.from(process.env.ZIMAGE_SOURCE_PNG, 'base64');

// The chat answer's markdown: the picture from the gateway's store first.
const storedImage = /^!\[[^\]]*\]\(http:\/\/[^)]+\/v1\/zimage\/images\/[0-9a-f]{32}\.png\)/;

test('generateImage with openai.image("Z-Image"): PNG bytes of the size asked', async () => {
  const { image } = await generateImage({ model: openai.image('Z-Image'), prompt: 'a red fox in the snow', size: '1024x1024' });
  assert.equal(image.mediaType, 'image/png');
  assert.equal(pngSize(image.uint8Array), '1024x1024');
});

test('generateImage with openai.image("gpt-image-1"), an alias: b64_json without response_format', async () => {
  const { image, providerMetadata } = await generateImage({ model: openai.image('gpt-image-1'), prompt: 'a lighthouse', size: '1536x1024' });
  assert.equal(pngSize(image.uint8Array), '1536x1024');
  assert.equal(providerMetadata.openai.images[0].revisedPrompt, 'a lighthouse');
});

test('an edit: generateImage({prompt: {text, images}}) on the edit model', async () => {
  const { image } = await generateImage({
    model: openai.image('Qwen-Image-Edit'),
    prompt: { text: 'make it night', images: [sourcePNG] },
    size: '1024x1024',
  });
  assert.equal(pngSize(image.uint8Array), '1024x1024');
});

// The Responses API: the picture as a tool result of image_generation
// (base64), and the markdown text for those that show only text.
function assertImageToolResult(toolResults) {
  const results = toolResults.filter((r) => r.toolName === 'image_generation');
  assert.equal(results.length, 1, `tool results ${JSON.stringify(toolResults.map((r) => r.toolName))}`);
  const png = Buffer.from(results[0].output.result, 'base64');
  assert.equal(pngSize(png), '2048x2048'); // no ratio asked: 1:1
}

test('generateText with openai("Z-Image") (the Responses API)', async () => {
  const result = await generateText({ model: openai('Z-Image'), prompt: 'a red fox' });
  assert.match(result.text, storedImage);
  assert.match(result.text, /\*\*📝 Prompt:\*\*\na red fox/);
  assertImageToolResult(result.toolResults);
});

test('streamText with openai("Z-Image") (the Responses API)', async () => {
  const result = streamText({ model: openai('Z-Image'), prompt: 'a red fox' });
  let text = '';
  for await (const delta of result.textStream) {
    text += delta;
  }
  assert.match(text, storedImage);
  assert.equal(await result.text, text);
  assertImageToolResult(await result.toolResults);
});

test('generateText with an image on the edit model (the Responses API): an edit', async () => {
  const result = await generateText({
    model: openai('Qwen-Image-Edit'),
    messages: [{ role: 'user', content: [{ type: 'text', text: 'make it night' }, { type: 'image', image: sourcePNG, mediaType: 'image/png' }] }],
  });
  assert.match(result.text, storedImage);
  assert.match(result.text, /\*\*✏️ Edit Instruction:\*\*\nmake it night/);
  const [tool] = result.toolResults.filter((r) => r.toolName === 'image_generation');
  // the 40×30 source, fitted into the service's sides keeping its shape
  assert.equal(pngSize(Buffer.from(tool.output.result, 'base64')), '88x64');
});

test('generateText with openai.chat("Z-Image") (chat completions)', async () => {
  const result = await generateText({ model: openai.chat('Z-Image'), prompt: 'a red fox' });
  assert.match(result.text, storedImage);
  assert.match(result.text, /\*\*📐 Resolution:\*\* 2048×2048/);
});

test('streamText with openai.chat("Z-Image") (chat completions, streamed)', async () => {
  const result = streamText({ model: openai.chat('Z-Image'), prompt: 'a red fox' });
  let text = '';
  for await (const delta of result.textStream) {
    text += delta;
  }
  assert.match(text, storedImage);
  assert.match(text, /\*\*📐 Resolution:\*\* 2048×2048/);
});
