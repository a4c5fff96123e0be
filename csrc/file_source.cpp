// The three ways kvfast reads chunk bytes (see file_source.h), and the SIGBUS guard the mmap source needs.
#include "file_source.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "crc32c.h"
#include "stream_copy.h"

namespace kvfast {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kNone: return "none";
    case ErrorKind::kTruncated: return "truncated";
    case ErrorKind::kChecksum: return "checksum";
    case ErrorKind::kOs: return "os";
    case ErrorKind::kCancelled: return "cancelled";
    case ErrorKind::kDevice: return "device";
  }
  return "?";
}

namespace {

constexpr uint64_t kPage = 4096;  // chunk offsets are multiples of this (docs/FORMAT.md §2): O_DIRECT, mmap


uint64_t round_down(uint64_t n, uint64_t a) { return n / a * a; }
uint64_t round_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// ==========================================================================================================
// SIGBUS guard
// ==========================================================================================================
// Touching a mapped page that lies past the end of a file (it was truncated after we mapped it) raises
// SIGBUS. While a guarded copy runs, the thread's t_bus_jump points at its sigsetjmp buffer and the handler
// jumps back there; any other SIGBUS goes to whatever handler was installed before ours (Python's
// faulthandler, or the default action), so a real crash elsewhere stays a crash.
thread_local sigjmp_buf* t_bus_jump = nullptr;
struct sigaction g_previous_bus;  // the handler ours replaced
std::mutex g_bus_mutex;

void on_sigbus(int sig, siginfo_t* info, void* ucontext) {
  if (sigjmp_buf* jump = t_bus_jump) {
    t_bus_jump = nullptr;
    siglongjmp(*jump, 1);  // SA_NODEFER: no signal mask to restore
  }
  if (g_previous_bus.sa_flags & SA_SIGINFO) {
    g_previous_bus.sa_sigaction(sig, info, ucontext);
  } else if (g_previous_bus.sa_handler != SIG_DFL && g_previous_bus.sa_handler != SIG_IGN) {
    g_previous_bus.sa_handler(sig);
  } else {
    signal(SIGBUS, SIG_DFL);  // returning re-runs the faulting access, which now takes the default action
  }
}

// (Re)installs the handler; called when an mmap load starts, so a handler installed since (e.g. by
// faulthandler.enable()) is chained rather than lost.
void install_bus_guard() {
  std::lock_guard<std::mutex> lock(g_bus_mutex);
  struct sigaction current;
  sigaction(SIGBUS, nullptr, &current);
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return;
  struct sigaction ours;
  std::memset(&ours, 0, sizeof ours);
  ours.sa_sigaction = on_sigbus;
  ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
  sigemptyset(&ours.sa_mask);
  sigaction(SIGBUS, &ours, &g_previous_bus);
}

// Copies src into the iovecs in order, continuing *crc (when given) over the bytes written.
void copy_out(const uint8_t* src, const iovec* iov, int iovcnt, uint32_t* crc, bool stream) {
  for (int i = 0; i < iovcnt; ++i) {
    auto* dst = static_cast<uint8_t*>(iov[i].iov_base);
    if (crc != nullptr) {
      *crc = crc32c_copy(dst, src, iov[i].iov_len, *crc, stream);
    } else if (stream) {
      stream_copy(dst, src, iov[i].iov_len);
    } else {
      std::memcpy(dst, src, iov[i].iov_len);
    }
    src += iov[i].iov_len;
  }
  if (stream) stream_fence();  // the streamed bytes are globally visible before the chunk is reported done
}

// copy_out from a mapping; false when a page of src vanished under it (SIGBUS).
bool guarded_copy_out(const uint8_t* src, const iovec* iov, int iovcnt, uint32_t* crc, bool stream) {
  sigjmp_buf jump;
  if (sigsetjmp(jump, 0) != 0) return false;  // arrived here from on_sigbus
  t_bus_jump = &jump;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  copy_out(src, iov, iovcnt, crc, stream);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_bus_jump = nullptr;
  return true;
}

// ==========================================================================================================
// preadv
// ==========================================================================================================
// Two ways, by measurement (bench/RESULTS.md, 2 cores): without a checksum, the kernel copies page cache ->
// destination pieces (one copy). With one, the pieces the loader streams into the paged cache go through an
// L2-sized bounce buffer instead: preadv into the bounce (the kernel's copy lands in L2 and is quick), then
// crc32c_copy out of it with non-temporal stores, computing the CRC on the values as they are written. That
// is ~10% faster with two threads (~20% with one) than preadv into the cache followed by a CRC pass over the
// cache's bytes: the checksum costs no pass of its own, and the cache lines are never read for ownership.
class PreadvSource final : public FileSource {
 public:
  PreadvSource(int fd, uint64_t max_read_bytes) : fd_(fd), max_read_bytes_(max_read_bytes) {}
  ~PreadvSource() override { ::close(fd_); }

  bool alloc_scratch(SourceScratch* s) const override {
    *s = SourceScratch{};
    s->bounce_bytes = round_up(max_read_bytes_, kPage);
    s->bounce = static_cast<uint8_t*>(std::aligned_alloc(kPage, s->bounce_bytes));
    return s->bounce != nullptr;
  }

  Status begin_chunk(uint64_t, uint64_t, SourceScratch*) override { return {}; }

  Status read(uint64_t offset, const iovec* iov, int iovcnt, uint64_t nbytes, SourceScratch* scratch, uint32_t* crc,
              bool stream) override {
    if (crc != nullptr && stream && nbytes <= scratch->bounce_bytes) {
      const iovec bounce = {scratch->bounce, nbytes};
      Status s = read_all(offset, &bounce, 1, nbytes);
      if (s.ok()) copy_out(scratch->bounce, iov, iovcnt, crc, true);
      return s;
    }
    Status s = read_all(offset, iov, iovcnt, nbytes);
    if (s.ok() && crc != nullptr)  // staging pieces just landed and are still in L2: check them there
      for (int i = 0; i < iovcnt; ++i) *crc = crc32c(iov[i].iov_base, iov[i].iov_len, *crc);
    return s;
  }

  Method method() const override { return Method::kPreadv; }

 private:
  Status read_all(uint64_t offset, const iovec* iov, int iovcnt, uint64_t nbytes) {
    ssize_t got = preadv_retry(offset, iov, iovcnt);
    if (got >= 0 && static_cast<uint64_t>(got) == nbytes) return {};  // the common case: one call
    // Short read (a file that shrank, or a signal): continue from where it stopped on a private iovec copy.
    std::vector<iovec> rest(iov, iov + iovcnt);
    uint64_t done = 0;
    size_t first = 0;
    for (;;) {
      if (got < 0) return Status::os_error(errno, offset + done, errno_text("preadv"));
      if (got == 0) return Status::truncated(offset + done, "short read");
      done += static_cast<uint64_t>(got);
      if (done == nbytes) return {};
      size_t left = static_cast<size_t>(got);
      while (left >= rest[first].iov_len) left -= rest[first++].iov_len;
      rest[first].iov_base = static_cast<uint8_t*>(rest[first].iov_base) + left;
      rest[first].iov_len -= left;
      got = preadv_retry(offset + done, rest.data() + first, static_cast<int>(rest.size() - first));
    }
  }

  ssize_t preadv_retry(uint64_t offset, const iovec* iov, int iovcnt) {
    ssize_t got;
    do got = ::preadv(fd_, iov, iovcnt, static_cast<off_t>(offset));
    while (got < 0 && errno == EINTR);
    return got;
  }
  int fd_;  // our dup of the caller's descriptor
  uint64_t max_read_bytes_;  // the bounce buffer's size
};

// ==========================================================================================================
// mmap: map the file once, copy chunks out of the mapping
// ==========================================================================================================
// Copies are crc32c_copy (non-temporal stores into the paged cache, CRC of the values written). Pages fault in
// on first touch; prefaulting each chunk with MADV_POPULATE_READ measured no faster, and without it a file
// truncated under the mapping meets the SIGBUS guard, which the tests then exercise.
class MmapSource final : public FileSource {
 public:
  MmapSource(int fd, uint8_t* map, uint64_t length) : fd_(fd), map_(map), length_(length) {}
  ~MmapSource() override {
    munmap(map_, length_);
    ::close(fd_);
  }

  Status begin_chunk(uint64_t, uint64_t, SourceScratch*) override { return {}; }

  Status read(uint64_t offset, const iovec* iov, int iovcnt, uint64_t nbytes, SourceScratch*, uint32_t* crc,
              bool stream) override {
    if (!guarded_copy_out(map_ + offset, iov, iovcnt, crc, stream))
      return Status::truncated(offset, "SIGBUS reading the mapping");
    // Past the new end of a shrunk file, the rest of its last page reads as zeros without any SIGBUS: check
    // the size after copying, so what was copied is known to have been in the file.
    struct stat st;
    if (fstat(fd_, &st) != 0) return Status::os_error(errno, offset, errno_text("fstat"));
    if (static_cast<uint64_t>(st.st_size) < offset + nbytes)
      return Status::truncated(static_cast<uint64_t>(st.st_size), "the file ends inside the chunk");
    return {};
  }

  Method method() const override { return Method::kMmap; }

 private:
  int fd_;
  uint8_t* map_;  // [length_] bytes of the file, PROT_READ, MAP_SHARED
  uint64_t length_;
};

// ==========================================================================================================
// O_DIRECT: whole chunks into an aligned bounce buffer (no page cache), then copied out
// ==========================================================================================================
class ODirectSource final : public FileSource {
 public:
  ODirectSource(int fd, uint64_t max_chunk_bytes) : fd_(fd), max_chunk_bytes_(max_chunk_bytes) {}
  ~ODirectSource() override { ::close(fd_); }

  bool alloc_scratch(SourceScratch* s) const override {
    s->bounce_bytes = round_up(max_chunk_bytes_, kPage) + kPage;  // an unaligned start costs one more page
    s->bounce = static_cast<uint8_t*>(std::aligned_alloc(kPage, s->bounce_bytes));
    return s->bounce != nullptr;
  }

  Status begin_chunk(uint64_t offset, uint64_t length, SourceScratch* s) override {
    const uint64_t start = round_down(offset, kPage);
    const uint64_t need = offset + length - start;  // bytes from `start` the chunk needs
    const uint64_t want = round_up(offset + length, kPage) - start;  // O_DIRECT sizes are page multiples
    uint64_t done = 0;
    s->bounce_valid = 0;
    while (done < need) {
      ssize_t got = ::pread(fd_, s->bounce + done, want - done, static_cast<off_t>(start + done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) return Status::os_error(errno, start + done, errno_text("pread (O_DIRECT)"));
      if (got == 0) return Status::truncated(start + done, "short read");
      done += static_cast<uint64_t>(got);
      if (done % kPage != 0) break;  // end of file: the next O_DIRECT read would be unaligned
    }
    if (done < need) return Status::truncated(start + done, "short read");
    s->bounce_offset = start;
    s->bounce_valid = done;
    return {};
  }

  Status read(uint64_t offset, const iovec* iov, int iovcnt, uint64_t nbytes, SourceScratch* s, uint32_t* crc,
              bool stream) override {
    if (offset < s->bounce_offset || offset + nbytes > s->bounce_offset + s->bounce_valid)
      return Status::os_error(EINVAL, offset, "read outside the chunk begin_chunk loaded");  // a loader bug
    copy_out(s->bounce + (offset - s->bounce_offset), iov, iovcnt, crc, stream);
    return {};
  }

  Method method() const override { return Method::kODirect; }

 private:
  int fd_;  // opened with O_DIRECT
  uint64_t max_chunk_bytes_;
};

}  // namespace

// ==========================================================================================================
// public
// ==========================================================================================================
bool parse_method(const std::string& name, Method* out) {
  if (name == "preadv") *out = Method::kPreadv;
  else if (name == "mmap") *out = Method::kMmap;
  else if (name == "odirect") *out = Method::kODirect;
  else return false;
  return true;
}

const char* method_name(Method m) {
  switch (m) {
    case Method::kPreadv: return "preadv";
    case Method::kMmap: return "mmap";
    case Method::kODirect: return "odirect";
  }
  return "?";
}

bool FileSource::alloc_scratch(SourceScratch* s) const {
  *s = SourceScratch{};
  return true;
}

void FileSource::free_scratch(SourceScratch* s) {
  std::free(s->bounce);
  *s = SourceScratch{};
}

std::unique_ptr<FileSource> FileSource::open(int fd, Method method, uint64_t file_end, uint64_t max_chunk_bytes,
                                             uint64_t max_read_bytes, Status* error) {
  // Our own descriptor: the caller may close theirs (an asynchronous load outlives kvfast.open's reader).
  int own = -1;
  if (method == Method::kODirect) {
    // O_DIRECT on a dup would change the caller's open file description too; reopen the same inode instead.
    std::string self = "/proc/self/fd/" + std::to_string(fd);
    own = ::open(self.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (own < 0) {
      *error = Status::os_error(errno, 0, errno == EINVAL ? "this file's filesystem does not support O_DIRECT; "
                                                            "use method='preadv'"
                                                          : errno_text("open O_DIRECT"));
      return nullptr;
    }
  } else {
    own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) {
      *error = Status::os_error(errno, 0, errno_text("dup"));
      return nullptr;
    }
  }
  switch (method) {
    case Method::kPreadv:
      // Chunks are read in file order: say so (a larger readahead window). Measured neutral on this VM's
      // virtio disk, where the default 8 MiB window already keeps up with the copies.
      posix_fadvise(own, 0, 0, POSIX_FADV_SEQUENTIAL);
      return std::make_unique<PreadvSource>(own, max_read_bytes);
    case Method::kODirect:
      return std::make_unique<ODirectSource>(own, max_chunk_bytes);
    case Method::kMmap: {
      void* map = mmap(nullptr, file_end, PROT_READ, MAP_SHARED, own, 0);
      if (map == MAP_FAILED) {
        *error = Status::os_error(errno, 0, errno_text("mmap"));
        ::close(own);
        return nullptr;
      }
      install_bus_guard();
      // Everything mapped will be read: start readahead of it now (a no-op for pages already cached).
      // MADV_SEQUENTIAL measured slower cold here, so it is not used.
      madvise(map, file_end, MADV_WILLNEED);
      return std::make_unique<MmapSource>(own, static_cast<uint8_t*>(map), file_end);
    }
  }
  ::close(own);
  return nullptr;
}

}  // namespace kvfast
