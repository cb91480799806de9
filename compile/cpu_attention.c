/* The attention of a CPU library's multi-token forwards, linked into the library (compile/build.py).

   TVM's paged KV cache computes a forward of several tokens per sequence in two calls, merged in float:
   the new tokens among themselves (the ragged slot, or the tree slot for a token tree), then against
   the pages cached before them (the paged slot). A decode attends to all its keys in one pass, and the
   merge's rounding is enough to change a token of an int8-quantized model (compile/attention.py). So
   the library's cache gets these three functions in those slots. The first keeps the new tokens' keys
   and values and the buffers TVM gives it for the attention; the paged one runs the library's chunk
   kernel over the pages and the kept keys at once, into those buffers, and reports an empty attention
   (zero, with log-sum-exp EMPTY_LSE) in its own, which TVM then merges in: an empty attention weighs
   exactly zero. TVM calls them in that order, layer by layer, on one thread, and skips the paged call
   when no sequence has cached pages, where the first runs the kernel itself over no pages
   (AttentionInternal in TVM's src/runtime/vm/paged_kv_cache.cc). They are C, not Python callbacks:
   sixty calls into Python per verify cost more than its attention (1.5 ms of a 9 ms verify).

   compile/attention.py passes FEW_QUERIES, PAGE_SIZE, EMPTY_LSE and the chunk kernels' symbols. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

int CHUNK_KERNEL(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);
int CHUNK_KERNEL_FEW(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

/* An int32 array of the glue's own, passed to the kernel as a DLTensor; it grows, never shrinks. */
typedef struct {
  int32_t* data;
  int64_t capacity;
  int64_t shape[1];
  DLTensor tensor;
} IntArray;

/* What the new tokens' call keeps for the paged call of the same layer. */
typedef struct {
  int kind; /* NOTHING, CHAIN or TREE */
  int few;  /* the kernel in small tiles: no sequence has more than FEW_QUERIES queries */
  TVMFFIAny q_indptr, k, v, kv_indptr, output, lse;
} Kept;

enum { NOTHING, CHAIN, TREE };

static _Thread_local Kept kept;
/* a chain's new keys are its k and v rows in order: 0 .. n-1 */
static _Thread_local IntArray chain_rows;
/* A token tree's node is a sequence of one query whose new keys are those of its path from the root,
   itself last: what its decode would attend to after that path. */
static _Thread_local IntArray node_q_indptr, node_kv_rows, node_kv_indptr, tree_nodes;
static _Thread_local IntArray node_page_indptr, node_page_values, node_length_info;
/* an empty page table, for forwards with nothing cached */
static _Thread_local IntArray no_page_indptr, no_page_values, no_length_info;
static _Thread_local void* no_pages_data;
static _Thread_local int64_t no_pages_bytes, no_pages_shape[5];
static _Thread_local DLTensor no_pages;

static int fail(const char* message) {
  TVMFFIErrorSetRaisedFromCStr("RuntimeError", message);
  return -1;
}

static DLTensor* tensor_of(const TVMFFIAny* a) {
  if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)a->v_ptr;
  if (a->type_index == kTVMFFITensor) return (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));
  return NULL;
}

static const int32_t* ints(const TVMFFIAny* a) {
  DLTensor* t = tensor_of(a);
  return (const int32_t*)((char*)t->data + t->byte_offset);
}

static int64_t elements(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

static int64_t length(const TVMFFIAny* a) { return tensor_of(a)->shape[0]; }

static int32_t* resize(IntArray* a, int64_t n) {
  if (n > a->capacity || a->data == NULL) {
    int64_t capacity = n > 2 * a->capacity ? n : 2 * a->capacity;
    int32_t* data = realloc(a->data, (size_t)(capacity > 0 ? capacity : 1) * sizeof(int32_t));
    if (data == NULL) return NULL;
    a->data = data;
    a->capacity = capacity > 0 ? capacity : 1;
  }
  a->shape[0] = n;
  a->tensor = (DLTensor){.data = a->data, .device = {kDLCPU, 0}, .ndim = 1,
                         .dtype = {kDLInt, 32, 1}, .shape = a->shape, .strides = NULL, .byte_offset = 0};
  return a->data;
}

static TVMFFIAny pass(DLTensor* t) {
  TVMFFIAny a;
  memset(&a, 0, sizeof(a));
  a.type_index = kTVMFFIDLTensorPtr;
  a.v_ptr = t;
  return a;
}

static void hold(TVMFFIAny* slot, const TVMFFIAny* a) {
  *slot = *a;
  if (a->type_index >= kTVMFFIStaticObjectBegin) TVMFFIObjectIncRef(a->v_obj);
}

static void release(TVMFFIAny* slot) {
  if (slot->type_index >= kTVMFFIStaticObjectBegin) TVMFFIObjectDecRef(slot->v_obj);
  slot->type_index = kTVMFFINone;
}

static void keep(int kind, int few, const TVMFFIAny* q_indptr, const TVMFFIAny* k, const TVMFFIAny* v,
                 const TVMFFIAny* kv_indptr, const TVMFFIAny* output, const TVMFFIAny* lse) {
  kept.kind = kind;
  kept.few = few;
  hold(&kept.q_indptr, q_indptr);
  hold(&kept.k, k);
  hold(&kept.v, v);
  hold(&kept.kv_indptr, kv_indptr);
  hold(&kept.output, output);
  hold(&kept.lse, lse);
}

static void forget(void) {
  release(&kept.q_indptr);
  release(&kept.k);
  release(&kept.v);
  release(&kept.kv_indptr);
  release(&kept.output);
  release(&kept.lse);
  kept.kind = NOTHING;
}

/* the chunk kernel: (q, q_indptr, pages, page_indptr, page_values, length_info, k, v, kv_rows, kv_indptr,
   output, lse, sm_scale) */
static int attend(int few, const TVMFFIAny args[13]) {
  TVMFFIAny result;
  memset(&result, 0, sizeof(result));
  result.type_index = kTVMFFINone;
  return (few ? CHUNK_KERNEL_FEW : CHUNK_KERNEL)(NULL, args, 13, &result);
}

/* An empty page table for `batch` sequences, with one unused page of k's shape and dtype, so every
   buffer has an element. */
static int empty_page_table(int64_t batch, const DLTensor* k, TVMFFIAny out[4]) {
  int64_t h_kv = k->shape[1], d = k->shape[2];
  int64_t bytes = 2 * h_kv * PAGE_SIZE * d * ((k->dtype.bits * k->dtype.lanes + 7) / 8);
  if (bytes > no_pages_bytes) {
    free(no_pages_data);
    no_pages_data = calloc(1, (size_t)bytes);
    no_pages_bytes = no_pages_data ? bytes : 0;
  }
  int32_t* indptr = resize(&no_page_indptr, batch + 1);
  int32_t* values = resize(&no_page_values, 1);
  int32_t* lengths = resize(&no_length_info, batch);
  if (!no_pages_data || !indptr || !values || !lengths) return fail("out of memory in the CPU attention");
  memset(indptr, 0, (size_t)(batch + 1) * sizeof(int32_t));
  memset(lengths, 0, (size_t)(batch > 0 ? batch : 1) * sizeof(int32_t));
  values[0] = 0;
  int64_t shape[5] = {1, 2, h_kv, PAGE_SIZE, d};
  memcpy(no_pages_shape, shape, sizeof(shape));
  no_pages = (DLTensor){.data = no_pages_data, .device = {kDLCPU, 0}, .ndim = 5, .dtype = k->dtype,
                        .shape = no_pages_shape, .strides = NULL, .byte_offset = 0};
  out[0] = pass(&no_pages);
  out[1] = pass(&no_page_indptr.tensor);
  out[2] = pass(&no_page_values.tensor);
  out[3] = pass(&no_length_info.tensor);
  return 0;
}

/* The new tokens' attention when nothing is cached, else kept for the paged call. */
static int keep_or_attend(int kind, int few, int cached, const TVMFFIAny* q, const TVMFFIAny* q_indptr,
                          const TVMFFIAny* k, const TVMFFIAny* v, const TVMFFIAny* kv_rows,
                          const TVMFFIAny* kv_indptr, const TVMFFIAny* output, const TVMFFIAny* lse,
                          const TVMFFIAny* sm_scale) {
  if (kept.kind != NOTHING) forget(); /* a forward that failed between the two calls */
  if (cached) {
    keep(kind, few, q_indptr, k, v, kv_indptr, output, lse);
    return 0;
  }
  TVMFFIAny table[4];
  if (empty_page_table(length(q_indptr) - 1, tensor_of(k), table) != 0) return -1;
  TVMFFIAny args[13] = {*q, *q_indptr, table[0], table[1], table[2], table[3], *k, *v, *kv_rows, *kv_indptr,
                        *output, *lse, *sm_scale};
  return attend(few, args);
}

/* ragged slot: (q, q_indptr, k, v, kv_indptr, q_positions, cached_lengths, output, lse, causal,
   rotary_mode, rope_scale, rope_theta, sm_scale) */
int __tvm_ffi_mlc_spec_attention_new_tokens(void* self, const TVMFFIAny* args, int32_t num_args,
                                             TVMFFIAny* result) {
  (void)self, (void)result;
  if (num_args != 14) return fail("mlc_spec_attention_new_tokens: TVM's ragged attention slot changed");
  const int32_t* q_indptr = ints(&args[1]);
  const int32_t* cached_lengths = ints(&args[6]);
  int64_t batch = length(&args[1]) - 1, n = length(&args[2]);
  int few = 1, cached = 0;
  for (int64_t b = 0; b < batch; ++b) {
    few &= q_indptr[b + 1] - q_indptr[b] <= FEW_QUERIES;
    cached |= cached_lengths[b] != 0;
  }
  int32_t* rows = resize(&chain_rows, n);
  if (rows == NULL) return fail("out of memory in the CPU attention");
  for (int64_t i = 0; i < n; ++i) rows[i] = (int32_t)i;
  TVMFFIAny kv_rows = pass(&chain_rows.tensor);
  return keep_or_attend(CHAIN, few, cached, &args[0], &args[1], &args[2], &args[3], &kv_rows, &args[4],
                        &args[7], &args[8], &args[13]);
}

/* tree slot: (q, q_indptr, k, v, kv_indptr, q_positions, mn_indptr, tree_order, output, lse, rotary_mode,
   rope_scale, rope_theta, sm_scale). tree_order holds TVM's depth-first interval [first, end) of each
   node: j is on i's path when first[j] <= first[i] < end[j], and ancestors come before descendants. */
int __tvm_ffi_mlc_spec_attention_new_tree(void* self, const TVMFFIAny* args, int32_t num_args,
                                          TVMFFIAny* result) {
  (void)self, (void)result;
  if (num_args != 14) return fail("mlc_spec_attention_new_tree: TVM's tree attention slot changed");
  const int32_t* q_indptr = ints(&args[1]);
  const int32_t* q_positions = ints(&args[5]);
  const int32_t* order = ints(&args[7]);
  int64_t batch = length(&args[1]) - 1, nodes = q_indptr[batch], n_rows = 0;
  int cached = 0;
  int32_t* per_sequence = resize(&tree_nodes, batch);
  int32_t* node_indptr = resize(&node_q_indptr, nodes + 1);
  int32_t* kv_indptr = resize(&node_kv_indptr, nodes + 1);
  if (!per_sequence || !node_indptr || !kv_indptr) return fail("out of memory in the CPU attention");
  kv_indptr[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int32_t start = q_indptr[b], stop = q_indptr[b + 1];
    cached |= q_positions[start] != 0; /* a tree's root sits right after its cached tokens */
    per_sequence[b] = stop - start;
    for (int32_t i = start; i < stop; ++i) {
      node_indptr[i] = i;
      for (int32_t j = start; j < stop; ++j) {
        if (order[2 * j] <= order[2 * i] && order[2 * i] < order[2 * j + 1]) {
          if (resize(&node_kv_rows, n_rows + 1) == NULL) return fail("out of memory in the CPU attention");
          node_kv_rows.data[n_rows++] = j;
        }
      }
      kv_indptr[i + 1] = (int32_t)n_rows;
    }
  }
  node_indptr[nodes] = (int32_t)nodes;
  if (resize(&node_kv_rows, n_rows) == NULL) return fail("out of memory in the CPU attention");
  TVMFFIAny q_indptr_nodes = pass(&node_q_indptr.tensor), kv_rows = pass(&node_kv_rows.tensor),
            kv_indptr_nodes = pass(&node_kv_indptr.tensor);
  return keep_or_attend(TREE, 1, cached, &args[0], &q_indptr_nodes, &args[2], &args[3], &kv_rows,
                        &kv_indptr_nodes, &args[8], &args[9], &args[13]);
}

/* Each tree node's copy of its sequence's page table. */
static int page_tables_per_node(const TVMFFIAny* page_indptr_arg, const TVMFFIAny* page_values_arg,
                                const TVMFFIAny* length_info_arg, TVMFFIAny out[3]) {
  const int32_t *page_indptr = ints(page_indptr_arg), *page_values = ints(page_values_arg),
                *length_info = ints(length_info_arg);
  int64_t batch = tree_nodes.shape[0], nodes = 0, total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    nodes += tree_nodes.data[b];
    total += (int64_t)tree_nodes.data[b] * (page_indptr[b + 1] - page_indptr[b]);
  }
  int32_t* indptr = resize(&node_page_indptr, nodes + 1);
  int32_t* values = resize(&node_page_values, total + 1); /* never empty */
  int32_t* lengths = resize(&node_length_info, nodes);
  if (!indptr || !values || !lengths) return fail("out of memory in the CPU attention");
  int64_t node = 0, at = 0;
  indptr[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int32_t pages = page_indptr[b + 1] - page_indptr[b];
    for (int32_t i = 0; i < tree_nodes.data[b]; ++i, ++node) {
      memcpy(values + at, page_values + page_indptr[b], (size_t)pages * sizeof(int32_t));
      at += pages;
      indptr[node + 1] = (int32_t)at;
      lengths[node] = length_info[b];
    }
  }
  values[at] = 0;
  out[0] = pass(&node_page_indptr.tensor);
  out[1] = pass(&node_page_values.tensor);
  out[2] = pass(&node_length_info.tensor);
  return 0;
}

static void report_empty(const TVMFFIAny* output, const TVMFFIAny* lse) {
  DLTensor *o = tensor_of(output), *l = tensor_of(lse);
  memset((char*)o->data + o->byte_offset, 0,
         (size_t)(elements(o) * ((o->dtype.bits * o->dtype.lanes + 7) / 8)));
  float* values = (float*)((char*)l->data + l->byte_offset);
  for (int64_t i = 0, n = elements(l); i < n; ++i) values[i] = (float)EMPTY_LSE;
}

/* paged slot: (q, q_indptr, pages, page_indptr, page_values, length_info, k_rope_pos_offset, q_positions,
   output, lse, causal, rotary_mode, rope_scale, rope_theta, sm_scale) */
int __tvm_ffi_mlc_spec_attention_cached_pages(void* self, const TVMFFIAny* args, int32_t num_args,
                                              TVMFFIAny* result) {
  (void)self, (void)result;
  if (num_args != 15) return fail("mlc_spec_attention_cached_pages: TVM's paged attention slot changed");
  if (kept.kind == NOTHING) return fail("mlc_spec_attention_cached_pages: called before the new tokens' part");
  TVMFFIAny tables[3] = {args[3], args[4], args[5]};
  TVMFFIAny kv_rows = pass(&chain_rows.tensor);
  if (kept.kind == TREE) {
    if (page_tables_per_node(&args[3], &args[4], &args[5], tables) != 0) {
      forget();
      return -1;
    }
    kv_rows = pass(&node_kv_rows.tensor);
  }
  TVMFFIAny call[13] = {args[0], kept.q_indptr, args[2], tables[0], tables[1], tables[2], kept.k, kept.v,
                        kv_rows, kept.kv_indptr, kept.output, kept.lse, args[14]};
  int status = attend(kept.few, call);
  forget();
  if (status == 0) report_empty(&args[8], &args[9]);
  return status;
}
