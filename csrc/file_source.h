// Where chunk bytes come from: one open .kvf file read with preadv, through a memory mapping, or with O_DIRECT.
//
// A FileSource copies file bytes [offset, offset + nbytes) into a list of destination pieces (iovecs, in file
// order) and continues the chunk's CRC-32C over the bytes it delivered. The loader (paged_loader.h) decides
// where the pieces point: straight into the paged cache, or into a staging buffer.
//   preadv   the kernel copies page cache -> pieces (the one copy), or, when there is a CRC to compute on
//            pieces bound for the paged cache, into an L2-sized bounce buffer that is then copied out as mmap
//            does (faster: see file_source.cpp).
//   mmap     copy and CRC in one pass out of the mapping (crc32c_copy): each value is checked as it is stored.
//   odirect  whole chunks land in an aligned bounce buffer by DMA; then as mmap, out of that buffer.
//
// Every source survives a file that changes underneath it: a short read, a file that shrank, or (mmap) a SIGBUS
// on a page past the new end of the file is reported as ErrorKind::kTruncated, never a crash.
#pragma once
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace kvfast {

enum class Method { kPreadv, kMmap, kODirect };

// Parses "preadv" | "mmap" | "odirect"; false for anything else.
bool parse_method(const std::string& name, Method* out);
const char* method_name(Method m);

enum class ErrorKind { kNone = 0, kTruncated, kChecksum, kOs, kCancelled, kDevice };  // kDevice: a CUDA call
// "none", "truncated", "checksum", "os", "cancelled", "device": the name kvfast/loader.py maps to an exception.
const char* error_kind_name(ErrorKind kind);

// The outcome of one step. `offset` is the file offset the failure was seen at, `err` an errno for kOs.
struct Status {
  ErrorKind kind = ErrorKind::kNone;
  int err = 0;
  uint64_t offset = 0;
  std::string detail;
  bool ok() const { return kind == ErrorKind::kNone; }
  static Status truncated(uint64_t at, std::string why) { return {ErrorKind::kTruncated, 0, at, std::move(why)}; }
  static Status os_error(int e, uint64_t at, std::string why) { return {ErrorKind::kOs, e, at, std::move(why)}; }
};

// Memory one worker thread owns for the whole load (no allocation per chunk).
struct SourceScratch {
  uint8_t* bounce = nullptr;  // [bounce_bytes], 4096-aligned: O_DIRECT reads land here
  size_t bounce_bytes = 0;
  uint64_t bounce_offset = 0;  // file offset of bounce[0]
  size_t bounce_valid = 0;     // bytes of bounce holding file data
};

class FileSource {
 public:
  virtual ~FileSource() = default;

  // Opens a source over `fd` (the caller keeps its own descriptor; the source dups or maps it). `file_end` is
  // the size the validated chunk index needs; `max_chunk_bytes` the largest chunk; `max_read_bytes` the most
  // one read() asks for. Returns nullptr and sets
  // `error` when the method cannot be used on this file (e.g. O_DIRECT on a filesystem without it).
  static std::unique_ptr<FileSource> open(int fd, Method method, uint64_t file_end, uint64_t max_chunk_bytes,
                                          uint64_t max_read_bytes, Status* error);

  // Scratch a worker needs for this source; release with free_scratch.
  virtual bool alloc_scratch(SourceScratch* s) const;
  static void free_scratch(SourceScratch* s);

  // Hook before a chunk's reads (O_DIRECT reads the whole chunk into the bounce buffer here; preadv and mmap
  // hint the kernel about what comes next).
  virtual Status begin_chunk(uint64_t offset, uint64_t length, SourceScratch* s) = 0;

  // Copies file bytes [offset, offset + nbytes) into iov[0..iovcnt) in order (sum of iov_len == nbytes) and,
  // when crc is given, continues *crc over the bytes written. stream: nobody reads the pieces again soon (the
  // paged cache, not a staging buffer), so sources that copy may bypass the cache with non-temporal stores.
  virtual Status read(uint64_t offset, const iovec* iov, int iovcnt, uint64_t nbytes, SourceScratch* s,
                      uint32_t* crc, bool stream) = 0;

  virtual Method method() const = 0;
};

}  // namespace kvfast
