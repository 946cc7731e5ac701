// The float64 kernels (table.h), compiled on their own, alongside the other types.

#include "table.h"

namespace normcore {
const Table kF64Table = table_of<double>();
}  // namespace normcore
