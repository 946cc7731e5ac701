// The bfloat16 kernels (table.h), compiled on their own, alongside the other types.

#include "table.h"

namespace normcore {
const Table kBF16Table = table_of<bf16>();
}  // namespace normcore
