// Keeps one PixelMed DicomSRValidator alive and validates the files named on stdin, one per line.
// Building the validator compiles PixelMed's 6 MB template stylesheet, which is most of the cost of
// the command-line tool; a long-lived process pays it once per worker instead of once per object.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;

import com.pixelmed.validate.DicomSRValidator;

public class SRValidatorServer {
    public static final String END = "@@AINODE-END@@";

    public static void main(String[] args) throws Exception {
        PrintStream out = new PrintStream(System.out, true, "UTF-8");
        DicomSRValidator validator = new DicomSRValidator();
        out.println("@@AINODE-READY@@");
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            String path = line.trim();
            if (path.isEmpty()) {
                continue;
            }
            try {
                out.println(validator.validate(path));
            } catch (Throwable t) {
                out.println("Error: validator failed on " + path + ": " + t);
            }
            out.println(END);
        }
    }
}
