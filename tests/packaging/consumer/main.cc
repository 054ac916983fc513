// embed_one ADDRESS IMAGE: embeds the whole image through the installed arcface::client and
// prints the embedding's dimension, its norm and its values (one line each).
#include <cstdio>
#include <memory>
#include <vector>

#include "client/cpp/client.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s ADDRESS IMAGE\n", argv[0]);
    return 2;
  }
  arcface::client::ClientOptions options;
  options.addresses = {argv[1]};
  auto client = arcface::client::Client::Create(options);
  if (!client.ok()) {
    std::fprintf(stderr, "%s\n", client.status().ToString().c_str());
    return 1;
  }
  auto face = arcface::client::FaceInput::FromFile(argv[2]);
  if (!face.ok()) {
    std::fprintf(stderr, "%s\n", face.status().ToString().c_str());
    return 1;
  }
  auto embeddings = (*client)->Embed({*face});
  if (!embeddings.ok()) {
    std::fprintf(stderr, "%s\n", embeddings.status().ToString().c_str());
    return 1;
  }
  const arcface::client::Embedding& embedding = embeddings->front();
  std::printf("dimension %zu\nnorm %.9g\nvalues", embedding.values.size(), embedding.norm);
  for (float v : embedding.values) std::printf(" %.9g", v);
  std::printf("\n");
  return 0;
}
