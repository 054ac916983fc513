// ONNX Runtime throughput peer: prints one JSON line per batch size.
//
//   node ort_bench.mjs MODEL.onnx [--batch 1,8,32] [--threads 2] [--seconds 10] [--warmup 2]
//
// Input is random in [-1,1] (throughput does not depend on the values). Each batch size is
// warmed up first, then run back to back for at least --seconds (and at least 3 runs).
import ort from 'onnxruntime-node';

function usage(msg) {
  if (msg) console.error(`ort_bench: ${msg}`);
  console.error('usage: node ort_bench.mjs MODEL.onnx [--batch 1,8,32] [--threads 2] [--seconds 10] [--warmup 2]');
  process.exit(2);
}

const pos = [];
const opt = { batch: '1,8,32', threads: '2', seconds: '10', warmup: '2' };
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
if (pos.length !== 1) usage();
const batches = opt.batch.split(',').map((b) => parseInt(b, 10));
if (batches.some((b) => !(b > 0))) usage('bad --batch');
const threads = parseInt(opt.threads, 10);
const seconds = parseFloat(opt.seconds);
const warmup = parseInt(opt.warmup, 10);

const session = await ort.InferenceSession.create(pos[0], {
  intraOpNumThreads: threads,
  interOpNumThreads: 1,
  executionMode: 'sequential',
  graphOptimizationLevel: 'all',
});
const inputName = session.inputNames[0];
const PER = 3 * 112 * 112;

// deterministic pseudo-random input (xorshift32)
let state = 0x9e3779b9;
function rnd() {
  state ^= state << 13; state >>>= 0;
  state ^= state >>> 17;
  state ^= state << 5; state >>>= 0;
  return state / 4294967296;
}

for (const b of batches) {
  const data = new Float32Array(b * PER);
  for (let i = 0; i < data.length; i++) data[i] = rnd() * 2 - 1;
  const feeds = { [inputName]: new ort.Tensor('float32', data, [b, 3, 112, 112]) };
  for (let i = 0; i < warmup; i++) await session.run(feeds);
  const lat = [];
  const t0 = process.hrtime.bigint();
  let elapsed = 0;
  while (elapsed < seconds || lat.length < 3) {
    const t = process.hrtime.bigint();
    await session.run(feeds);
    const now = process.hrtime.bigint();
    lat.push(Number(now - t) / 1e6);
    elapsed = Number(now - t0) / 1e9;
  }
  lat.sort((x, y) => x - y);
  const q = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))];
  console.log(JSON.stringify({
    runtime: `onnxruntime-node ${ort.env.versions.node}`,
    model: pos[0], batch: b, threads, runs: lat.length, seconds: +elapsed.toFixed(3),
    faces_per_s: +((lat.length * b) / elapsed).toFixed(2),
    ms_per_batch_p50: +q(0.5).toFixed(2), ms_per_batch_p90: +q(0.9).toFixed(2),
  }));
}
