// Runs ONNX Runtime on every golden case's preprocessed input (inputs/<case>.f32, float32
// [3,112,112] in [-1,1]) for one model key and writes {"cases": {name: [512 floats]}}.
//
//   node ort_run.mjs MODEL.onnx GOLDENS_DIR OUT.json [--model-key r50] [--threads 2]
//
// The second, independent check of the C++ engine (ONNX Runtime is InsightFace's own runtime).
import fs from 'node:fs';
import path from 'node:path';
import ort from 'onnxruntime-node';

function usage(msg) {
  if (msg) console.error(`ort_run: ${msg}`);
  console.error('usage: node ort_run.mjs MODEL.onnx GOLDENS_DIR OUT.json [--model-key r50] [--threads 2] [--batch 8]');
  process.exit(2);
}

const pos = [];
const opt = { 'model-key': 'r50', threads: '2', batch: '8' };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i].startsWith('--')) {
    const k = argv[i].slice(2);
    if (!(k in opt) || i + 1 >= argv.length) usage(`bad option ${argv[i]}`);
    opt[k] = argv[++i];
  } else {
    pos.push(argv[i]);
  }
}
if (pos.length !== 3) usage();
const [modelPath, goldensDir, outPath] = pos;
const batch = Math.max(1, parseInt(opt.batch, 10));

const goldens = JSON.parse(fs.readFileSync(path.join(goldensDir, 'goldens.json'), 'utf8'));
const cases = goldens.cases.filter((c) => c.model === opt['model-key']);
if (cases.length === 0) usage(`no cases for model key ${opt['model-key']}`);

const session = await ort.InferenceSession.create(modelPath, {
  intraOpNumThreads: parseInt(opt.threads, 10),
  interOpNumThreads: 1,
  executionMode: 'sequential',
  graphOptimizationLevel: 'all',
});
const inputName = session.inputNames[0];
const outputName = session.outputNames[0];
const PER = 3 * 112 * 112;

function readF32(file) {
  const buf = fs.readFileSync(path.join(goldensDir, file));
  if (buf.length !== PER * 4) throw new Error(`${file}: ${buf.length} bytes, expected ${PER * 4}`);
  // copy into an aligned Float32Array (little-endian host)
  const out = new Float32Array(PER);
  new Uint8Array(out.buffer).set(buf);
  return out;
}

const result = {};
for (let s = 0; s < cases.length; s += batch) {
  const chunk = cases.slice(s, s + batch);
  const data = new Float32Array(chunk.length * PER);
  chunk.forEach((c, i) => data.set(readF32(c.input.f32), i * PER));
  const feeds = { [inputName]: new ort.Tensor('float32', data, [chunk.length, 3, 112, 112]) };
  const out = (await session.run(feeds))[outputName];
  const dim = out.dims[1];
  chunk.forEach((c, i) => {
    result[c.name] = Array.from(out.data.subarray(i * dim, (i + 1) * dim));
  });
}
fs.writeFileSync(outPath, JSON.stringify({ model: modelPath, model_key: opt['model-key'], cases: result }));
console.log(`ort_run: ${Object.keys(result).length} cases -> ${outPath}`);
