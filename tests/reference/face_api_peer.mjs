// face-api itself (the npm package's browser bundle, TF.js's CPU backend) on one image: prints
// the values that test_detect_ref.py records as FACE_API_*, as JSON. Not run by ctest: it needs
// the package's dist/ (in the tarball that deploy/fetch-models.sh caches) and a minute of CPU.
//   tar -xzf ~/.cache/arcface-models/vladmandic-face-api-1.7.15.tgz -C /tmp package/dist/face-api.esm.js
//   /usr/bin/python3 -c "import sys; sys.path.insert(0, 'tests/reference'); import detect_ref as r; \
//     r.read_rgb('tests/data/multi_face.jpg').tofile('/tmp/multi.rgb')"
//   node tests/reference/face_api_peer.mjs /tmp/package/dist/face-api.esm.js models/face-api \
//     /tmp/multi.rgb 667 1000
// The image is raw RGB bytes (height x width x 3), passed to face-api as an int32 tensor, as its
// node examples pass a decoded image.
import fs from 'fs';
import path from 'path';
import { pathToFileURL } from 'url';

const [bundle, models, rgbFile, height, width] = process.argv.slice(2);
if (!width) {
  console.error('usage: face_api_peer.mjs FACE_API_ESM_JS MODELS_DIR IMAGE.rgb HEIGHT WIDTH');
  process.exit(2);
}
// The browser bundle picks its platform at import: as a "browser" it needs only globals that
// node has (TextEncoder); as node it would want tfjs-node's native library.
globalThis.window = globalThis;
globalThis.document = {};
const faceapi = await import(pathToFileURL(path.resolve(bundle)).href);
const { tf } = faceapi;
await tf.setBackend('cpu');
await tf.ready();

function load(net, name) {
  const manifest = JSON.parse(fs.readFileSync(path.join(models, `${name}-weights_manifest.json`)));
  const weights = {};
  for (const group of manifest) {
    const bytes = Buffer.concat(group.paths.map((p) => fs.readFileSync(path.join(models, p))));
    const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    Object.assign(weights, tf.io.decodeWeights(buffer, group.weights));
  }
  net.loadFromWeightMap(weights);
}
load(faceapi.nets.ssdMobilenetv1, 'ssd_mobilenetv1_model');
load(faceapi.nets.tinyFaceDetector, 'tiny_face_detector_model');
load(faceapi.nets.faceLandmark68Net, 'face_landmark_68_model');

const rgb = fs.readFileSync(rgbFile);
const image = tf.tensor3d(Int32Array.from(rgb), [Number(height), Number(width), 3], 'int32');
const round = (v, digits) => Number(v.toFixed(digits));
const detection = (d) => [round(d.score, 4), ...[d.box.x, d.box.y, d.box.x + d.box.width,
  d.box.y + d.box.height].map((v) => round(v, 1))];

const ssd = await faceapi.nets.ssdMobilenetv1.locateFaces(
  image, new faceapi.SsdMobilenetv1Options({ minConfidence: 0.3 }));
const tiny = await faceapi.nets.tinyFaceDetector.locateFaces(
  image, new faceapi.TinyFaceDetectorOptions({ inputSize: 416, scoreThreshold: 0.3 }));
const faces = await faceapi.detectAllFaces(
  image, new faceapi.SsdMobilenetv1Options({ minConfidence: 0.5 })).withFaceLandmarks();
const ids = [0, 8, 16, 30, 36, 39, 42, 45, 48, 54];
console.log(JSON.stringify({
  ssd: ssd.map(detection),
  tiny: tiny.map(detection),
  landmarks: faces.map((f) => [
    [f.detection.box.x, f.detection.box.y, f.detection.box.x + f.detection.box.width,
      f.detection.box.y + f.detection.box.height].map((v) => round(v, 4)),
    ids.map((i) => f.unshiftedLandmarks.positions[i]).map((p) => [round(p.x, 3), round(p.y, 3)]),
  ]),
}, null, 1));
