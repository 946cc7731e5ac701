// The float16 kernels (table.h), compiled on their own, alongside the other types.

#include "table.h"

namespace normcore {
const Table kF16Table = table_of<f16>();
}  // namespace normcore
