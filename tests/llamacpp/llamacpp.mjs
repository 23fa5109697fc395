// Drive the real llama.cpp (node-llama-cpp's prebuilt CPU build) for gptkit's GGUF tests.
//
//   GPTKIT_LLAMACPP_DIR=.cache/llamacpp node tests/llamacpp/llamacpp.mjs jobs.json > results.json
//
// GPTKIT_LLAMACPP_DIR is the folder where `npm i -E node-llama-cpp@3.21.1` was run. jobs.json
// lists GGUF files and what to do with each, so one process (one llama.cpp start) serves
// every check:
//   {"models": [{"path": "m.gguf", "context": 256, "threads": 1,
//                "tokenize": ["text", ...],          -> "tokens": [[id, ...], ...]
//                "detokenize": [[id, ...], ...],     -> "texts": ["...", ...]
//                "greedy": [[id, ...], ...], "max_tokens": 32,   -> "greedy": [[id, ...], ...]
//                "perplexity": [[id, ...], ...],     -> "nll": summed -log p, "predicted": count
//                "chat": [{"user": "text", "max_tokens": 24}, ...],
//                   -> "chat": [{"text": answer, "tokens": [prompt and answer ids]}, ...]
//                "bench": {"prompt": [id, ...], "tokens": 128}}]}  -> "bench": {tokens_per_s, ...}
// Each result also carries the GGUF metadata llama.cpp read. Tokenization parses special
// tokens (a literal "<|endoftext|>" is that token, as in gptkit) and adds no bos/eos.
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const dir = process.env.GPTKIT_LLAMACPP_DIR;
if (!dir) throw new Error("set GPTKIT_LLAMACPP_DIR to the folder holding node_modules/node-llama-cpp");
const pkgDir = join(dir, "node_modules", "node-llama-cpp");
const pkg = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8"));
const {getLlama, JinjaTemplateChatWrapper, LlamaChat} =
    await import(pathToFileURL(join(pkgDir, pkg.exports["."].import)).href);

const jobs = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const results = {llama_cpp: llama.llamaCppRelease, node_llama_cpp: pkg.version, models: []};

for (const job of jobs.models) {
    const model = await llama.loadModel({modelPath: job.path});
    const out = {path: job.path, metadata: flatten(model.fileInfo.metadata)};
    out.tokens = (job.tokenize ?? []).map((text) => Array.from(model.tokenize(text, true)));
    out.texts = (job.detokenize ?? []).map((ids) => model.detokenize(ids, true));
    const needsContext = job.greedy?.length || job.perplexity?.length || job.bench || job.chat;
    if (needsContext) {
        const size = job.context ?? 256;
        // one thread by default: on a busy 2-core machine, llama.cpp's spinning worker
        // threads can make a tiny model's token take a second instead of a millisecond
        const context = await model.createContext({contextSize: size, batchSize: size, sequences: 1,
                                                   threads: job.threads ?? 1});
        const sequence = context.getSequence();
        out.greedy = [];
        for (const prompt of job.greedy ?? []) {
            await sequence.clearHistory();
            out.greedy.push(await greedy(sequence, prompt, job.max_tokens ?? 32));
        }
        out.nll = 0;
        out.predicted = 0;
        for (const ids of job.perplexity ?? []) {
            await sequence.clearHistory();
            const items = ids.slice(0, -1).map((t) => [t, {generateNext: {probabilities: true}}]);
            const evaluated = await sequence.controlledEvaluate(items);
            for (let i = 0; i < items.length; i++) {
                const p = evaluated[i]?.next?.probabilities?.get(ids[i + 1]);
                if (p === undefined) throw new Error(`no probability for token ${ids[i + 1]} at ${i}`);
                out.nll -= Math.log(p);
                out.predicted += 1;
            }
        }
        // A one-turn conversation through node-llama-cpp's chat API, rendered with the Jinja
        // template the file carries; greedy, stopping where llama.cpp's end-of-turn stops it.
        out.chat = [];
        for (const turn of job.chat ?? []) {
            await sequence.clearHistory();
            const template = model.fileInfo.metadata.tokenizer.chat_template;
            const chat = new LlamaChat({contextSequence: sequence,
                                        chatWrapper: new JinjaTemplateChatWrapper({template})});
            const history = [{type: "user", text: turn.user}, {type: "model", response: []}];
            const answer = await chat.generateResponse(history, {maxTokens: turn.max_tokens ?? 24,
                                                                 temperature: 0});
            out.chat.push({text: answer.response, stop: answer.metadata.stopReason,
                           tokens: Array.from(sequence.contextTokens)});
            chat.dispose({disposeSequence: false});
        }
        if (job.bench) {
            await sequence.clearHistory();
            await greedy(sequence, job.bench.prompt, 8); // warm up
            await sequence.clearHistory();
            const start = performance.now();
            const tokens = await greedy(sequence, job.bench.prompt, job.bench.tokens);
            const seconds = (performance.now() - start) / 1000;
            out.bench = {tokens: tokens.length, seconds, tokens_per_s: tokens.length / seconds,
                         threads: context.currentThreads};
        }
        await context.dispose();
    }
    await model.dispose();
    results.models.push(out);
}
process.stdout.write(JSON.stringify(results));

// Greedy decoding: temperature 0 takes the most likely token; no penalties, no stop tokens.
async function greedy(sequence, prompt, maxTokens) {
    const tokens = [];
    for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
        tokens.push(token);
        if (tokens.length >= maxTokens) break;
    }
    return tokens;
}

// The metadata as flat "a.b.c" keys, long arrays (tokens, merges) as their lengths.
function flatten(value, prefix = "", into = {}) {
    for (const [key, item] of Object.entries(value)) {
        const name = prefix ? `${prefix}.${key}` : key;
        if (Array.isArray(item)) into[name] = item.length > 64 ? {length: item.length} : item;
        else if (item !== null && typeof item === "object") flatten(item, name, into);
        else into[name] = typeof item === "bigint" ? Number(item) : item;
    }
    return into;
}
