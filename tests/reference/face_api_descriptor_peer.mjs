// face-api itself (the npm package's browser bundle, TF.js's CPU backend) computing the dlib
// ResNet descriptor (faceRecognitionNet.computeFaceDescriptor) of N 150x150 chips: prints the
// descriptors as JSON, for test_dlib_ref.py's FACE_API_DESCRIPTORS. Not run by ctest (it needs
// the package's dist/, in the tarball that deploy/fetch-models.sh caches):
//   tar -xzf ~/.cache/arcface-models/vladmandic-face-api-1.7.15.tgz -C /tmp package/dist/face-api.esm.js
//   (the chips: N x 150 x 150 x 3 raw RGB bytes, e.g. the first three johns photos, RGB order)
//   NODE_PATH=tests/reference/node_modules node tests/reference/face_api_descriptor_peer.mjs \
//     /tmp/package/dist/face-api.esm.js models/face-api /tmp/chips.rgb 3
import fs from 'fs';
import path from 'path';
import { pathToFileURL } from 'url';

const [bundle, models, rgbFile, count] = process.argv.slice(2);
if (!count) {
  console.error('usage: face_api_descriptor_peer.mjs FACE_API_ESM_JS MODELS_DIR CHIPS.rgb N');
  process.exit(2);
}
// As face_api_peer.mjs: the browser bundle needs only globals that node has.
globalThis.window = globalThis;
globalThis.document = {};
const faceapi = await import(pathToFileURL(path.resolve(bundle)).href);
const { tf } = faceapi;
await tf.setBackend('cpu');
await tf.ready();

const manifest = JSON.parse(
  fs.readFileSync(path.join(models, 'face_recognition_model-weights_manifest.json')));
const weights = {};
for (const group of manifest) {
  const bytes = Buffer.concat(group.paths.map((p) => fs.readFileSync(path.join(models, p))));
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  Object.assign(weights, tf.io.decodeWeights(buffer, group.weights));
}
faceapi.nets.faceRecognitionNet.loadFromWeightMap(weights);

const chipBytes = 150 * 150 * 3;
const rgb = fs.readFileSync(rgbFile);
const descriptors = [];
for (let i = 0; i < Number(count); ++i) {
  const chip = Int32Array.from(rgb.subarray(i * chipBytes, (i + 1) * chipBytes));
  const image = tf.tensor3d(chip, [150, 150, 3], 'int32');
  descriptors.push(Array.from(await faceapi.nets.faceRecognitionNet.computeFaceDescriptor(image)));
  image.dispose();
}
console.log(JSON.stringify(descriptors));
