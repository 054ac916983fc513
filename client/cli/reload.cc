// `arcface-client reload [MODEL ...]`: ModelAdmin.ReloadModels (commands.h has the contract).
#include <cstdio>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/commands.h"

namespace arcface::cli {

int RunReload(const CommonOptions& common, const ReloadOptions& options) {
  auto client = MakeClient(common);
  if (!client.ok()) return Fail("client", client.status(), true);
  absl::StatusOr<arcface::v1::ReloadModelsResponse> r = (*client)->ReloadModels(options.models);
  if (!r.ok()) {
    const int rc = Fail("reload", r.status());
    if (r.status().code() == absl::StatusCode::kUnimplemented) {
      std::fprintf(stderr,
                   "arcface-client: reload: restart the server with --admin-rpc, or reload every "
                   "model with SIGHUP: kill -HUP <pid>, docker kill -s HUP <container>\n");
    }
    return rc;
  }
  bool failed = false;
  for (const arcface::v1::ModelReload& m : r->models()) {
    failed |= m.result() == arcface::v1::ModelReload::FAILED;
  }
  if (options.json) {
    PrintProtoJson(*r);
    return failed ? kExitSomeFailed : kExitOk;
  }
  std::cout << absl::StrFormat("%-16s %-9s %8s  %s\n", "MODEL", "RESULT", "SECONDS", "MODEL_ID");
  for (const arcface::v1::ModelReload& m : r->models()) {
    std::string ids;
    switch (m.result()) {
      case arcface::v1::ModelReload::RELOADED:
        ids = absl::StrCat(m.previous_model_id(), " -> ", m.model_id());
        break;
      case arcface::v1::ModelReload::FAILED:
        ids = absl::StrCat(m.model_id(), " (keeps serving): ", m.error());
        break;
      default:
        ids = m.model_id();
    }
    std::cout << absl::StrFormat("%-16s %-9s %8.2f  %s\n", m.model(),
                                 arcface::v1::ModelReload::Result_Name(m.result()), m.seconds(),
                                 ids);
  }
  return failed ? kExitSomeFailed : kExitOk;
}

}  // namespace arcface::cli
