/* The part of XLA's FFI C ABI (xla/ffi/api/c_api.h, API version 0.x) that fastadam's
 * handler uses, declared here so that the package builds without JAX or XLA.
 *
 * The ABI is versioned: within a major version, structs only grow at their end and each
 * carries its size in `struct_size`, so declaring a prefix of a struct is enough to read
 * the fields declared, once the size the caller reports is at least the prefix's. The
 * layouts below are those of the header shipped with jaxlib 0.10 (API 0.3); every field
 * used here has kept its place since API 0.1. fastadam._xla_ffi reports the version
 * below when XLA asks (the metadata call made at registration), and XLA refuses the
 * handler if it does not support that version.
 */
#ifndef FASTADAM_XLA_FFI_API_H
#define FASTADAM_XLA_FFI_API_H

#include <stddef.h>
#include <stdint.h>

#define FA_XLA_FFI_API_MAJOR 0
#define FA_XLA_FFI_API_MINOR 1

/* The size of a struct up to and including `field`: what XLA stores in struct_size. */
#define FA_STRUCT_SIZE(type, field) (offsetof(type, field) + sizeof(((type*)0)->field))

typedef enum { XLA_FFI_Extension_Metadata = 1 } XLA_FFI_Extension_Type;

typedef struct XLA_FFI_Extension_Base {
    size_t struct_size;
    XLA_FFI_Extension_Type type;
    struct XLA_FFI_Extension_Base* next;
} XLA_FFI_Extension_Base;

typedef struct XLA_FFI_Api_Version {
    size_t struct_size;
    XLA_FFI_Extension_Base* extension_start;
    int major_version;
    int minor_version;
} XLA_FFI_Api_Version;

typedef struct XLA_FFI_Error XLA_FFI_Error;  /* opaque, owned by XLA */

typedef enum {
    XLA_FFI_Error_Code_INVALID_ARGUMENT = 3,
    XLA_FFI_Error_Code_RESOURCE_EXHAUSTED = 8,
    XLA_FFI_Error_Code_FAILED_PRECONDITION = 9,
} XLA_FFI_Error_Code;

typedef struct XLA_FFI_Error_Create_Args {
    size_t struct_size;
    XLA_FFI_Extension_Base* extension_start;
    const char* message;        /* copied by XLA */
    XLA_FFI_Error_Code errc;
} XLA_FFI_Error_Create_Args;

typedef XLA_FFI_Error* XLA_FFI_Error_Create(XLA_FFI_Error_Create_Args* args);

typedef enum {
    XLA_FFI_DataType_PRED = 1,
    XLA_FFI_DataType_S32 = 4,
    XLA_FFI_DataType_S64 = 5,
    XLA_FFI_DataType_F16 = 10,
    XLA_FFI_DataType_F32 = 11,
    XLA_FFI_DataType_F64 = 12,
    XLA_FFI_DataType_BF16 = 16,
} XLA_FFI_DataType;

typedef struct XLA_FFI_Buffer {
    size_t struct_size;
    XLA_FFI_Extension_Base* extension_start;
    XLA_FFI_DataType dtype;
    void* data;
    int64_t rank;
    int64_t* dims;
} XLA_FFI_Buffer;

typedef enum { XLA_FFI_ArgType_BUFFER = 1 } XLA_FFI_ArgType;
typedef enum { XLA_FFI_RetType_BUFFER = 1 } XLA_FFI_RetType;
typedef enum { XLA_FFI_AttrType_SCALAR = 3 } XLA_FFI_AttrType;

typedef struct XLA_FFI_ByteSpan {
    const char* ptr;
    size_t len;
} XLA_FFI_ByteSpan;

typedef struct XLA_FFI_Scalar {
    XLA_FFI_DataType dtype;
    void* value;
} XLA_FFI_Scalar;

typedef enum {
    XLA_FFI_ExecutionStage_EXECUTE = 3,
} XLA_FFI_ExecutionStage;

typedef struct XLA_FFI_Args {
    size_t struct_size;
    XLA_FFI_Extension_Base* extension_start;
    int64_t size;
    XLA_FFI_ArgType* types;
    void** args;
} XLA_FFI_Args;

typedef struct XLA_FFI_Rets {
    size_t struct_size;
    XLA_FFI_Extension_Base* extension_start;
    int64_t size;
    XLA_FFI_RetType* types;
    void** rets;
} XLA_FFI_Rets;

typedef struct XLA_FFI_Attrs {
    size_t struct_size;
    XLA_FFI_Extension_Base* extension_start;
    int64_t size;
    XLA_FFI_AttrType* types;
    XLA_FFI_ByteSpan** names;
    void** attrs;
} XLA_FFI_Attrs;

/* The API table: only its head (the version and the first function) is used. */
typedef struct XLA_FFI_Api {
    size_t struct_size;
    XLA_FFI_Extension_Base* extension_start;
    XLA_FFI_Api_Version api_version;
    const void* internal_api;
    XLA_FFI_Error_Create* XLA_FFI_Error_Create;
} XLA_FFI_Api;

typedef struct XLA_FFI_ExecutionContext XLA_FFI_ExecutionContext;

/* A prefix: later versions append fields (the asynchronous result, ...). */
typedef struct XLA_FFI_CallFrame {
    size_t struct_size;
    XLA_FFI_Extension_Base* extension_start;
    const XLA_FFI_Api* api;
    XLA_FFI_ExecutionContext* ctx;
    XLA_FFI_ExecutionStage stage;
    XLA_FFI_Args args;
    XLA_FFI_Rets rets;
    XLA_FFI_Attrs attrs;
} XLA_FFI_CallFrame;

typedef uint32_t XLA_FFI_Handler_Traits;
typedef struct XLA_FFI_TypeId { int64_t type_id; } XLA_FFI_TypeId;

typedef struct XLA_FFI_Metadata {
    size_t struct_size;
    XLA_FFI_Api_Version api_version;
    XLA_FFI_Handler_Traits traits;
} XLA_FFI_Metadata;

typedef struct XLA_FFI_Metadata_Extension {
    XLA_FFI_Extension_Base extension_base;
    XLA_FFI_Metadata* metadata;
} XLA_FFI_Metadata_Extension;

enum {
    FA_CALL_FRAME_SIZE = FA_STRUCT_SIZE(XLA_FFI_CallFrame, attrs),
    FA_BUFFER_SIZE = FA_STRUCT_SIZE(XLA_FFI_Buffer, dims),
    FA_API_SIZE = FA_STRUCT_SIZE(XLA_FFI_Api, XLA_FFI_Error_Create),
    FA_API_VERSION_SIZE = FA_STRUCT_SIZE(XLA_FFI_Api_Version, minor_version),
    FA_METADATA_SIZE = FA_STRUCT_SIZE(XLA_FFI_Metadata, traits),
    FA_METADATA_EXTENSION_SIZE = FA_STRUCT_SIZE(XLA_FFI_Metadata_Extension, metadata),
    FA_ERROR_CREATE_ARGS_SIZE = FA_STRUCT_SIZE(XLA_FFI_Error_Create_Args, errc),
};

#endif
