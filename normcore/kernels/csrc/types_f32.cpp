// The float32 kernels (table.h), compiled on their own, alongside the other types.

#include "table.h"

namespace normcore {
const Table kF32Table = table_of<float>();
}  // namespace normcore
