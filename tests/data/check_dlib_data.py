#!/usr/bin/python3
"""Checks the dlib example data that fetch_dlib_data.sh put in DIR (ctest dlib_data).

Later suites evaluate detection and identity on these photos, so what they rely on is checked
here, exactly: the faces/ photos named by the two landmark files decode at the size the files
declare; each file holds the images and face boxes listed below, every box inside its image with
68 parts named 00..67, every part inside the image; johns/ holds five people with eleven
150x150 colour photos each. Usage: check_dlib_data.py DIR
"""

import os
import sys
import xml.etree.ElementTree as ET

import cv2

# The landmark files of Debian's libdlib19.1 19.24: image count and face-box count.
LANDMARK_FILES = {"training_with_face_landmarks.xml": (4, 18),
                  "testing_with_face_landmarks.xml": (5, 25)}
FACES_JPGS = 12  # the nine PASCAL VOC photos of the XML files and three more
PEOPLE, PHOTOS_EACH, JOHN_SIDE = 5, 11, 150
PART_NAMES = [f"{i:02d}" for i in range(68)]


def jpgs(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpg"))


def check_landmarks(faces, name, want_images, want_boxes, errors):
    root = ET.parse(os.path.join(faces, name)).getroot()
    images = root.findall("./images/image")
    boxes = 0
    for image in images:
        file = image.get("file")
        pixels = cv2.imread(os.path.join(faces, file), cv2.IMREAD_COLOR)
        if pixels is None:
            errors.append(f"{name}: {file} does not decode")
            continue
        h, w = pixels.shape[:2]
        if (w, h) != (int(image.get("width")), int(image.get("height"))):
            errors.append(f"{name}: {file} is {w}x{h}, the file says "
                          f"{image.get('width')}x{image.get('height')}")
        for box in image.findall("box"):
            boxes += 1
            left, top = int(box.get("left")), int(box.get("top"))
            bw, bh = int(box.get("width")), int(box.get("height"))
            where = f"{name}: {file} box at ({left},{top})"
            if not (bw > 0 and bh > 0 and left >= 0 and top >= 0 and left + bw <= w
                    and top + bh <= h):
                errors.append(f"{where} {bw}x{bh} is not inside the {w}x{h} image")
            parts = box.findall("part")
            if [p.get("name") for p in parts] != PART_NAMES:
                errors.append(f"{where}: {len(parts)} parts, not the 68 named 00..67")
            outside = [p.get("name") for p in parts
                       if not (0 <= int(p.get("x")) < w and 0 <= int(p.get("y")) < h)]
            if outside:
                errors.append(f"{where}: parts {outside} lie outside the image")
    if (len(images), boxes) != (want_images, want_boxes):
        errors.append(f"{name}: {len(images)} images and {boxes} face boxes, expected "
                      f"{want_images} and {want_boxes}")


def check_johns(johns, errors):
    people = sorted(d for d in os.listdir(johns) if os.path.isdir(os.path.join(johns, d)))
    if len(people) != PEOPLE:
        errors.append(f"johns/: {len(people)} people, expected {PEOPLE}")
    for person in people:
        photos = jpgs(os.path.join(johns, person))
        if len(photos) != PHOTOS_EACH:
            errors.append(f"johns/{person}: {len(photos)} photos, expected {PHOTOS_EACH}")
        for photo in photos:
            pixels = cv2.imread(os.path.join(johns, person, photo), cv2.IMREAD_COLOR)
            if pixels is None or pixels.shape != (JOHN_SIDE, JOHN_SIDE, 3):
                errors.append(f"johns/{person}/{photo}: not a {JOHN_SIDE}x{JOHN_SIDE} colour photo")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: check_dlib_data.py DIR")
    data = sys.argv[1]
    faces, johns = os.path.join(data, "faces"), os.path.join(data, "johns")
    if not os.path.isfile(os.path.join(data, ".complete")):
        sys.exit(f"check_dlib_data: {data} holds no complete fetch; run "
                 f"tests/data/fetch_dlib_data.sh {data}")
    errors = []
    if len(jpgs(faces)) != FACES_JPGS:
        errors.append(f"faces/: {len(jpgs(faces))} .jpg files, expected {FACES_JPGS}")
    for name, (want_images, want_boxes) in LANDMARK_FILES.items():
        check_landmarks(faces, name, want_images, want_boxes, errors)
    check_johns(johns, errors)
    for e in errors:
        print(f"check_dlib_data: {e}", file=sys.stderr)
    if errors:
        return 1
    print(f"check_dlib_data: {data}: faces/ {FACES_JPGS} photos, "
          + ", ".join(f"{n} {i} images / {b} faces x 68 landmarks"
                      for n, (i, b) in LANDMARK_FILES.items())
          + f"; johns/ {PEOPLE} people x {PHOTOS_EACH} photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
