#include "server/model/sha256.h"

#include <openssl/evp.h>

#include <algorithm>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"

namespace arcface::model {
namespace {

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

}  // namespace

absl::StatusOr<std::string> Sha256Hex(absl::string_view bytes) {
  std::unique_ptr<EVP_MD_CTX, MdCtxDeleter> ctx(EVP_MD_CTX_new());
  if (ctx == nullptr) return absl::InternalError("SHA-256: EVP_MD_CTX_new failed");
  if (EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    return absl::InternalError("SHA-256: EVP_DigestInit_ex failed");
  }
  // EVP_DigestUpdate takes a size_t, but feed it in bounded pieces anyway so that no
  // implementation-specific length limit can matter.
  constexpr size_t kChunk = size_t{1} << 30;
  for (size_t pos = 0; pos < bytes.size(); pos += kChunk) {
    const size_t n = std::min(kChunk, bytes.size() - pos);
    if (EVP_DigestUpdate(ctx.get(), bytes.data() + pos, n) != 1) {
      return absl::InternalError("SHA-256: EVP_DigestUpdate failed");
    }
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), digest, &digest_len) != 1 || digest_len != 32) {
    return absl::InternalError("SHA-256: EVP_DigestFinal_ex failed");
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), digest_len));
}

}  // namespace arcface::model
