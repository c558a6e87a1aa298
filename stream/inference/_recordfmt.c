/* Forecast records in C: the inner loop of stream.inference.batching.forecast_records.
 *
 * Why this exists: a bucket close turns thousands of forecasts into JSON records, 112
 * numbers each (28 steps x mean/p10/p50/p90). In Python the best found was ~8-12 us per
 * record (orjson formatting the batch's numbers, bytes.split, one bytes.join per record),
 * and the worker's one GIL spends a fifth of its time there (docs/performance-log.md). Here a
 * record costs about a microsecond.
 *
 * What it does, and nothing else: for each row, one bytes object
 *     prefix + ids[i] + seps[i][0] + v[i][0] + seps[i][1] + v[i][1] + ... + v[i][m-1] + tails[i]
 * where v are the row's numbers, already rounded to 4 decimals by the caller
 * (np.round(x, 4)), written exactly as orjson writes such a float. Every fragment (ids
 * already JSON-encoded, separators, tails) comes from Python. A row with a number this code
 * does not write (not finite, or |v| >= 1e9) gives None: the caller formats that row in
 * Python. tests/unit/stream/inference/test_recordfmt.py compares the output with the Python path byte for
 * byte on generated and edge values.
 *
 * Why the digits are right: y = round(x, 4) is the double nearest to k / 10^4 for the integer
 * k = rint(y * 10^4) (exact: |k| < 10^13, far below 2^53, and y * 10^4 is within 0.002 of
 * k). The shortest decimal that reads back as y (what orjson and repr write) is k / 10^4
 * without trailing zeros: a shorter or other decimal of that length is at least 10^-4 away
 * from it, and below 10^9 a double's spacing is under 2^-22, so it would read back as
 * another double. orjson writes such a number in plain notation ("0.0001", "123.5", "-0.0",
 * "7.0"), as below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

/* |v| below this is written here; the rest goes back to Python. */
#define LIMIT 1e9
/* Longest number written: "-999999999.9999". */
#define NUMBER_MAX 16

static char *
put_number(char *p, double y)
{
    long long k = llrint(y * 10000.0);
    unsigned long long a = (unsigned long long)(k < 0 ? -k : k);
    unsigned long long whole = a / 10000;
    unsigned int frac = (unsigned int)(a % 10000);
    char digits[12];
    int n = 0;

    if (signbit(y)) {
        *p++ = '-';
    }
    do {
        digits[n++] = (char)('0' + whole % 10);
        whole /= 10;
    } while (whole);
    while (n) {
        *p++ = digits[--n];
    }
    *p++ = '.';
    if (frac == 0) {
        *p++ = '0';
        return p;
    }
    digits[0] = (char)('0' + frac / 1000);
    digits[1] = (char)('0' + frac / 100 % 10);
    digits[2] = (char)('0' + frac / 10 % 10);
    digits[3] = (char)('0' + frac % 10);
    n = 4;
    while (digits[n - 1] == '0') {
        n--;
    }
    memcpy(p, digits, (size_t)n);
    return p + n;
}

static int
row_ok(const double *v, Py_ssize_t m)
{
    for (Py_ssize_t j = 0; j < m; j++) {
        /* Also false for NaN. */
        if (!(fabs(v[j]) < LIMIT)) {
            return 0;
        }
    }
    return 1;
}

static int
check_bytes_seq(PyObject *seq, Py_ssize_t n, const char *what)
{
    if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "expected %s to be a list or tuple", what);
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_ValueError, "expected %zd %s, got %zd", n, what,
                     PySequence_Fast_GET_SIZE(seq));
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "expected %s to hold bytes", what);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(format_rows_doc,
"format_rows(values, prefix, ids, seps, tails) -> list[bytes | None]\n\n"
"One record per row of ``values`` (C-contiguous float64, shape (n, m)): ``prefix``,\n"
"``ids[i]``, then each number preceded by ``seps[i][j]``, then ``tails[i]``. None for a\n"
"row with a number not finite or not below 1e9 in magnitude.");

static PyObject *
format_rows(PyObject *self, PyObject *args)
{
    PyObject *values_obj, *prefix, *ids, *seps, *tails;
    Py_buffer view;
    PyObject *out = NULL;

    if (!PyArg_ParseTuple(args, "OSOOO:format_rows", &values_obj, &prefix, &ids, &seps, &tails)) {
        return NULL;
    }
    if (PyObject_GetBuffer(values_obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) < 0) {
        return NULL;
    }
    if (view.ndim != 2 || view.itemsize != sizeof(double) || view.format == NULL
        || strcmp(view.format, "d") != 0) {
        PyErr_SetString(PyExc_ValueError, "expected a 2-d C-contiguous float64 array");
        goto done;
    }
    Py_ssize_t n = view.shape[0], m = view.shape[1];
    if (check_bytes_seq(ids, n, "ids") < 0 || check_bytes_seq(tails, n, "tails") < 0) {
        goto done;
    }
    if (!PyList_Check(seps) && !PyTuple_Check(seps)) {
        PyErr_SetString(PyExc_TypeError, "expected seps to be a list or tuple");
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(seps) != n) {
        PyErr_Format(PyExc_ValueError, "expected %zd seps, got %zd", n,
                     PySequence_Fast_GET_SIZE(seps));
        goto done;
    }
    PyObject **id_items = PySequence_Fast_ITEMS(ids);
    PyObject **tail_items = PySequence_Fast_ITEMS(tails);
    PyObject **sep_rows = PySequence_Fast_ITEMS(seps);
    const double *data = (const double *)view.buf;
    const char *prefix_p = PyBytes_AS_STRING(prefix);
    Py_ssize_t prefix_n = PyBytes_GET_SIZE(prefix);

    out = PyList_New(n);
    if (out == NULL) {
        goto done;
    }
    /* The separators of consecutive rows are usually the same tuple: its total length is
     * computed once per distinct tuple. */
    PyObject *last_row_seps = NULL;
    Py_ssize_t seps_n = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const double *v = data + i * m;
        PyObject *row_seps = sep_rows[i];
        if (row_seps != last_row_seps) {
            if (check_bytes_seq(row_seps, m, "separators per row") < 0) {
                Py_CLEAR(out);
                goto done;
            }
            PyObject **items = PySequence_Fast_ITEMS(row_seps);
            seps_n = 0;
            for (Py_ssize_t j = 0; j < m; j++) {
                seps_n += PyBytes_GET_SIZE(items[j]);
            }
            last_row_seps = row_seps;
        }
        if (!row_ok(v, m)) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(out, i, Py_None);
            continue;
        }
        PyObject *id = id_items[i], *tail = tail_items[i];
        Py_ssize_t cap = prefix_n + PyBytes_GET_SIZE(id) + seps_n + m * NUMBER_MAX
                         + PyBytes_GET_SIZE(tail);
        PyObject *record = PyBytes_FromStringAndSize(NULL, cap);
        if (record == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        char *start = PyBytes_AS_STRING(record), *p = start;
        memcpy(p, prefix_p, (size_t)prefix_n);
        p += prefix_n;
        memcpy(p, PyBytes_AS_STRING(id), (size_t)PyBytes_GET_SIZE(id));
        p += PyBytes_GET_SIZE(id);
        PyObject **items = PySequence_Fast_ITEMS(row_seps);
        for (Py_ssize_t j = 0; j < m; j++) {
            Py_ssize_t len = PyBytes_GET_SIZE(items[j]);
            memcpy(p, PyBytes_AS_STRING(items[j]), (size_t)len);
            p += len;
            p = put_number(p, v[j]);
        }
        memcpy(p, PyBytes_AS_STRING(tail), (size_t)PyBytes_GET_SIZE(tail));
        p += PyBytes_GET_SIZE(tail);
        if (_PyBytes_Resize(&record, p - start) < 0) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, record);
    }
done:
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"format_rows", format_rows, METH_VARARGS, format_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_recordfmt",
    "Forecast records in C (see stream.inference.batching.forecast_records).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__recordfmt(void)
{
    return PyModule_Create(&module);
}
