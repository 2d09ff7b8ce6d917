// Early-return helpers for absl::Status / absl::StatusOr.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MOED_STATUS_CONCAT_INNER(a, b) a##b
#define MOED_STATUS_CONCAT(a, b) MOED_STATUS_CONCAT_INNER(a, b)

#define MOED_RETURN_IF_ERROR(expr)                                  \
  do {                                                              \
    if (::absl::Status _moed_status = (expr); !_moed_status.ok()) { \
      return _moed_status;                                          \
    }                                                               \
  } while (0)

// MOED_ASSIGN_OR_RETURN(auto x, MakeX()); declares x or returns the error.
#define MOED_ASSIGN_OR_RETURN(lhs, expr) \
  MOED_ASSIGN_OR_RETURN_IMPL(MOED_STATUS_CONCAT(_moed_statusor_, __LINE__), lhs, expr)
#define MOED_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = *std::move(tmp)
