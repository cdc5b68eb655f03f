/*
 * Optimal 1-D k-means over sorted distinct values with weights (counts), by dynamic programming
 * whose row minima are found with SMAWK (Gronlund et al., "Fast exact k-means, k-medians and
 * Bregman divergence clustering in 1D", 2017, section 2.2).
 *
 * coremltools palettizes fp16 groups of >= 10,000 values with the kmeans1d package it vendors.
 * This routine takes the same decisions in the same order (SMAWK's reduce and interpolate steps,
 * the same tie rules) and does the same floating-point operations on the same prefix sums, so
 * its partitions and centroids are bit-identical to that package's, which the tests check. It is
 * faster because the row/column sets are index arithmetic and flat arrays instead of
 * std::function calls, per-level vectors and hash maps, and only two DP rows are kept.
 *
 * Must not be compiled with -ffast-math or floating-point contraction (FMA): the results must
 * round exactly like the reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __FAST_MATH__
#error "_kmeans1d must be compiled without -ffast-math: palettes must match coremltools bit for bit"
#endif

typedef struct {
    const double *cum_w;  /* prefix sums of weights, weights*x, weights*x*x: n + 1 entries each */
    const double *cum_s;
    const double *cum_q;
    const double *prev;   /* DP row for one cluster fewer */
    size_t *argmin;       /* SMAWK's answer per row */
    double *least;        /* and the value there: the DP row for one cluster more */
    size_t *position;     /* where a column sits in the current level's surviving columns */
    double *held;         /* reduce step's stack values (scratch, n entries) */
} Dp;

/* Squared error of one cluster holding sorted values i..j (0 when empty). */
static inline double cluster_cost(const Dp *dp, size_t i, size_t j) {
    if (j < i) return 0.0;
    double w = dp->cum_w[j + 1] - dp->cum_w[i];
    double s = dp->cum_s[j + 1] - dp->cum_s[i];
    double mu = s / w;
    double cost = dp->cum_q[j + 1] - dp->cum_q[i];
    cost += w * (mu * mu);
    cost -= (2 * mu) * s;
    return cost;
}

/* Cost of ending the last cluster at value `row` when it starts at value `col`. */
static inline double entry(const Dp *dp, size_t row, size_t col) {
    size_t before = (col == 0 || row < col - 1) ? row : col - 1;
    return dp->prev[before] + cluster_cost(dp, col, row);
}

/* Row minima for rows row0, row0 + step, ... (nrows of them) over the given columns. `stack`
 * has room for this level's surviving columns and every deeper level's. */
static void smawk(Dp *dp, size_t row0, size_t step, size_t nrows, const size_t *cols, size_t ncols,
                  size_t *stack) {
    if (nrows == 0) return;
    size_t top = 0;
    double *held = dp->held;  /* held[p] = entry(row p, stack[p]): a surviving column's own value */
    for (size_t a = 0; a < ncols; ++a) {
        size_t col = cols[a];
        while (top > 0) {
            if (entry(dp, row0 + (top - 1) * step, col) >= held[top - 1]) break;
            --top;
        }
        if (top < nrows) {
            held[top] = entry(dp, row0 + top * step, col);
            stack[top++] = col;
        }
    }
    smawk(dp, row0 + step, 2 * step, nrows / 2, stack, top, stack + top);
    for (size_t idx = 0; idx < top; ++idx) dp->position[stack[idx]] = idx;
    size_t start = 0;
    for (size_t r = 0; r < nrows; r += 2) {
        size_t row = row0 + r * step;
        size_t stop = (r + 1 < nrows) ? dp->position[dp->argmin[row + step]] : top - 1;
        size_t best = stack[start];
        double least = entry(dp, row, best);
        for (size_t c = start + 1; c <= stop; ++c) {
            double value = entry(dp, row, stack[c]);
            if (value < least) {
                best = stack[c];
                least = value;
            }
        }
        dp->argmin[row] = best;
        dp->least[row] = least;
        start = stop;
    }
}

#if defined(_WIN32) || defined(__CYGWIN__)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT
#endif

/* Prefix sums of w, w*x and w*x*x (n + 1 entries each), summed in the reference's order. */
static double *prefix_sums(const double *x, const double *w, size_t n) {
    double *cum = malloc(3 * (n + 1) * sizeof(double));
    if (!cum) return NULL;
    double *cum_w = cum, *cum_s = cum + n + 1, *cum_q = cum + 2 * (n + 1);
    cum_w[0] = cum_s[0] = cum_q[0] = 0.0;
    for (size_t i = 0; i < n; ++i) {
        cum_w[i + 1] = w[i] + cum_w[i];
        cum_s[i + 1] = w[i] * x[i] + cum_s[i];
        cum_q[i + 1] = w[i] * x[i] * x[i] + cum_q[i];
    }
    return cum;
}

/*
 * The DP over n strictly increasing values x with weights w, from `done` levels (clusters) to
 * `k`. Level l's row of `start_of` (k * n entries) gets, for each last value i, where the last of
 * l + 1 clusters starts; `row` holds the last level's costs on entry (when done > 0) and on exit.
 * Levels do not depend on k, so a table for k clusters serves every smaller k. Returns 0, or -1
 * when memory runs out.
 */
EXPORT int kmeans1d_levels(const double *x, const double *w, size_t n, size_t done, size_t k, double *row,
                           uint32_t *start_of) {
    if (n > UINT32_MAX) return -1;  /* start_of holds 32-bit positions */
    int status = -1;
    double *cum = prefix_sums(x, w, n);
    double *scratch = malloc(2 * n * sizeof(double));  /* the next DP row, the reduce step's values */
    size_t *work = malloc(5 * n * sizeof(size_t));  /* argmin, position, columns, 2n of stacks */
    if (!cum || !scratch || !work) goto done;

    double *prev = row, *cur = scratch;
    Dp dp = {cum, cum + n + 1, cum + 2 * (n + 1), prev, work, cur, work + n, scratch + n};
    size_t *all_cols = work + 2 * n, *stack = work + 3 * n;
    for (size_t i = 0; i < n; ++i) all_cols[i] = i;
    if (done == 0) {
        for (size_t i = 0; i < n; ++i) {
            prev[i] = cluster_cost(&dp, 0, i);
            start_of[i] = 0;
        }
        done = 1;
    }
    for (size_t level = done; level < k; ++level) {
        dp.prev = prev;
        dp.least = cur;
        smawk(&dp, 0, 1, n, all_cols, n, stack);
        uint32_t *starts = start_of + level * n;
        for (size_t i = 0; i < n; ++i) starts[i] = (uint32_t)dp.argmin[i];
        double *swap = prev;
        prev = cur;
        cur = swap;
    }
    if (prev != row) memcpy(row, prev, n * sizeof(double));
    status = 0;
done:
    free(cum);
    free(scratch);
    free(work);
    return status;
}

/*
 * Clusters of k (1 <= k <= levels in start_of) from the DP table: each value's cluster and the k
 * centroids (clusters that end up empty keep centroid 0). Returns 0, or -1 when memory runs out.
 */
EXPORT int kmeans1d_backtrack(const double *x, const double *w, size_t n, size_t k, const uint32_t *start_of,
                              int64_t *clusters, double *centroids) {
    double *cum_w = malloc((n + 1) * sizeof(double));
    if (!cum_w) return -1;
    cum_w[0] = 0.0;
    for (size_t i = 0; i < n; ++i) cum_w[i + 1] = w[i] + cum_w[i];  /* as prefix_sums sums them */
    for (size_t c = 0; c < k; ++c) centroids[c] = 0.0;
    size_t end = n, level = k - 1, last = n - 1, begin;
    do {
        size_t stop = end;
        begin = start_of[level * n + last];
        double centroid = 0.0;
        for (size_t i = begin; i < stop; ++i) {
            clusters[i] = (int64_t)level;
            /* running weighted mean, in the reference's order of operations */
            centroid += (x[i] - centroid) * (cum_w[i + 1] - cum_w[i]) / (cum_w[i + 1] - cum_w[begin]);
        }
        centroids[level] = centroid;
        level -= 1;
        last = begin - 1;
        end = begin;
    } while (begin > 0);
    free(cum_w);
    return 0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kmeans1d", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__kmeans1d(void) { return PyModule_Create(&module); }
