"""Facts about how the compiled kernels were built, and one CPU-state helper."""

cdef extern from *:
    """
    #ifdef CCDGRID_OPENMP
    #define CCDGRID_HAVE_OPENMP 1
    #else
    #define CCDGRID_HAVE_OPENMP 0
    #endif

    /* vzeroupper where the CPU has AVX, else nothing. Code that leaves the
       upper halves of the vector registers dirty (ISA-L's AVX-512 deflate
       does) makes every later SSE instruction of that thread slow, as the
       kernels built for the baseline ISA are: 4x for the correction matrix
       on a Zen 5, until some AVX code clears them. */
    #if defined(__GNUC__) && defined(__x86_64__)
    __attribute__((target("avx"))) static void ccdgrid_vzeroupper_avx(void)
    {
        __builtin_ia32_vzeroupper();
    }
    static int ccdgrid_cpu_has_avx(void)
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx");
    }
    #else
    static void ccdgrid_vzeroupper_avx(void) {}
    static int ccdgrid_cpu_has_avx(void) { return 0; }
    #endif
    """
    int CCDGRID_HAVE_OPENMP
    void ccdgrid_vzeroupper_avx() noexcept nogil
    int ccdgrid_cpu_has_avx() noexcept nogil


cdef bint _has_avx = ccdgrid_cpu_has_avx()


def openmp_enabled():
    """Return True if the kernels were compiled with OpenMP support."""
    return bool(CCDGRID_HAVE_OPENMP)


def clear_upper_vector_state():
    """Zero the upper halves of this thread's vector registers (``vzeroupper``).

    Call after a library that may leave them dirty (ISA-L's AVX-512 deflate,
    through python-isal): until they are cleared, the SSE instructions of
    the kernels built for the baseline ISA run several times slower on that
    thread (a 2048² correction took 33 instead of 8.4 ms after one
    ``isal_zlib.compress``, on a Zen 5). Does nothing on CPUs without AVX.
    """
    if _has_avx:
        ccdgrid_vzeroupper_avx()
